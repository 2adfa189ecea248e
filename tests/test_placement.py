import itertools

import pytest

from aiplane.core.config import Target
from aiplane.core.errors import PlacementError
from aiplane.core.placement import Requirements, allowed_regions, place

POLICY = {"eu": ["eu"], "ap": ["ap", "eu"], "us": "any"}
TARGETS = [
    Target(name="us-gpu", engine="ray", region="us", gpus=4, sla=["batch", "interactive"]),
    Target(name="eu-cpu", engine="local", region="eu", sla=["batch", "interactive"]),
    Target(name="ap-gpu", engine="kfp", region="ap", gpus=1),
]
ENGINES = {"local", "ray", "kfp"}


def test_eu_rows_never_train_outside_eu():
    decision = place(Requirements(workload="train", residency=("eu", "us")), TARGETS, POLICY, ENGINES)
    assert decision.target == "eu-cpu" and decision.region == "eu"
    assert decision.rejected["us-gpu"] == "residency: region 'us' is outside the regions allowed for data tagged eu (eu)"
    assert "residency: region 'eu' is allowed for data tagged eu;" in decision.reason


@pytest.mark.parametrize(
    "residency",
    [tags for n in range(4) for tags in itertools.combinations(["eu", "us", "ap"], n)],
)
@pytest.mark.parametrize("gpus", [0, 1])
def test_placement_never_chooses_a_region_outside_the_residency_policy(residency, gpus):
    allowed = allowed_regions(residency, POLICY)
    try:
        decision = place(Requirements(workload="w", residency=residency, gpus=gpus), TARGETS, POLICY, ENGINES)
    except PlacementError:
        # Only acceptable when no target is both allowed and capable.
        assert not any((allowed is None or t.region in allowed) and t.gpus >= gpus for t in TARGETS)
        return
    assert allowed is None or decision.region in allowed
    assert set(decision.rejected) | {decision.target} == {t.name for t in TARGETS}


def test_unrestricted_data_goes_to_the_first_capable_target():
    decision = place(Requirements(workload="w", residency=("us",)), TARGETS, POLICY, ENGINES)
    assert decision.target == "us-gpu"
    assert decision.rejected["eu-cpu"] == "qualifies, but 'us-gpu' comes first in the deployment"


def test_no_candidate_error_lists_every_target_and_why():
    with pytest.raises(PlacementError) as err:
        place(Requirements(workload="train", residency=("eu",), gpus=2), TARGETS, POLICY, ENGINES)
    msg = str(err.value)
    assert "No target can run train" in msg
    assert "us-gpu: residency: region 'us' is outside" in msg
    assert "eu-cpu: has 0 GPU(s), needs 2" in msg
    assert "ap-gpu: residency: region 'ap' is outside" in msg


def test_sla_engine_support_and_installation_are_checked():
    d = place(Requirements(workload="serve", engines=("local",)), TARGETS, POLICY, ENGINES)
    assert d.target == "eu-cpu"
    assert "cannot run this workload (supported: local)" in d.rejected["us-gpu"]
    d = place(Requirements(workload="serve", sla="interactive", residency=("ap",)), TARGETS, POLICY, ENGINES)
    assert d.target == "eu-cpu"
    assert "serves SLA classes batch, needs 'interactive'" in d.rejected["ap-gpu"]
    d = place(Requirements(workload="train", residency=("ap",), gpus=1), TARGETS, POLICY, {"local", "kfp"})
    assert d.target == "ap-gpu"
    assert "engine 'ray' is not installed" in d.rejected["us-gpu"]


def test_pinned_target_must_still_qualify():
    d = place(Requirements(workload="w", target="ap-gpu", gpus=1), TARGETS, POLICY, ENGINES)
    assert d.target == "ap-gpu" and d.reason.startswith("pinned to 'ap-gpu'")
    assert d.gpus == 1, "the decision carries the GPUs to reserve on the target"
    with pytest.raises(PlacementError, match="us-gpu: residency: region 'us' is outside"):
        place(Requirements(workload="w", target="us-gpu", residency=("eu",)), TARGETS, POLICY, ENGINES)


def test_tags_declared_any_do_not_restrict_and_policies_intersect():
    assert allowed_regions(["us"], POLICY) is None
    assert allowed_regions(["eu", "ap"], POLICY) == {"eu"}
    assert allowed_regions([], POLICY) is None


@pytest.mark.parametrize("tags", [("mars",), ("eu", "mars"), ("us", "Mars ")])
def test_a_tag_the_policy_does_not_know_is_placed_nowhere(tags):
    with pytest.raises(PlacementError, match="residency: data tagged 'mars' has no rule") as err:
        place(Requirements(workload="train", residency=tags), TARGETS, POLICY, ENGINES)
    assert "known tags: ap, eu, us" in str(err.value)


@pytest.mark.parametrize("tag", ["EU", "EU ", " eu", "Eu"])
def test_tags_are_compared_normalized_so_a_case_typo_still_restricts(tag):
    decision = place(Requirements(workload="train", residency=(tag, "us")), TARGETS, POLICY, ENGINES)
    assert decision.region == "eu"


def test_the_reason_names_only_the_tags_that_restrict():
    decision = place(Requirements(workload="train", residency=("ap", "eu", "us")), TARGETS, POLICY, ENGINES)
    assert "residency: region 'eu' is allowed for data tagged ap, eu;" in decision.reason
    assert "us" not in decision.reason.split(";")[0].split("tagged", 1)[1]
    unrestricted = place(Requirements(workload="w", residency=("us",)), TARGETS, POLICY, ENGINES)
    assert "residency: no tag of the data restricts the region" in unrestricted.reason


def test_a_pin_to_a_target_that_does_not_exist_says_so_and_suggests():
    with pytest.raises(PlacementError) as err:
        place(Requirements(workload="train", target="eu-cpux"), TARGETS, POLICY, ENGINES)
    assert str(err.value) == (
        "train is pinned to target 'eu-cpux', which does not exist; "
        "the deployment's targets: ap-gpu, eu-cpu, us-gpu. Did you mean 'eu-cpu'?"
    )
