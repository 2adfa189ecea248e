"""core/publishing: a folder appears whole or not at all, and retries stop where another try cannot help."""

from __future__ import annotations

import os

import pytest

from aiplane.core.errors import ConfigError, WorkloadError
from aiplane.core.publishing import Attempts, staged_dir


def test_a_staged_folder_appears_whole_with_the_mode_asked_and_leaves_no_staging(tmp_path):
    final = tmp_path / "out" / "sheet"
    with staged_dir(final, complete="a.json", mode=0o755) as staging:
        (staging / "a.json").write_text("{}")
        assert not final.exists()
    assert (final / "a.json").read_text() == "{}" and os.stat(final).st_mode & 0o777 == 0o755
    assert [p.name for p in final.parent.iterdir()] == ["sheet"]


def test_a_concurrent_writers_complete_folder_is_kept_and_an_incomplete_one_is_an_error(tmp_path):
    final = tmp_path / "sheet"
    with staged_dir(final, complete="a.json") as staging:
        (staging / "a.json").write_text("mine")
        final.mkdir()
        (final / "a.json").write_text("theirs")  # the other writer renamed first
    assert (final / "a.json").read_text() == "theirs" and len(list(tmp_path.iterdir())) == 1
    other = tmp_path / "half"
    with pytest.raises(OSError):
        with staged_dir(other, complete="a.json") as staging:
            (staging / "a.json").write_text("mine")
            (other / "junk").mkdir(parents=True)  # not a finished folder: nothing vouches for it
            (other / "junk" / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "sheet"]


def test_a_block_that_raises_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "sheet") as staging:
            (staging / "a.json").write_text("{}")
            raise RuntimeError("render failed")
    assert list(tmp_path.iterdir()) == []


def _attempts(refused=lambda exc, reason, what: None, tries=3):
    log: list[str] = []
    slept: list[float] = []
    attempt = Attempts("the registry at http://r", tries, 1.0, reason=lambda exc: f"{type(exc).__name__}: {exc}",
                       refused=refused, log=log.append, sleep=slept.append)  # fmt: skip
    return attempt, log, slept


def test_a_service_away_is_tried_again_with_doubling_waits_then_a_clear_error():
    attempt, log, slept = _attempts()
    answers = iter([ConnectionResetError("reset"), TimeoutError("slow"), "registered"])

    def call():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert attempt("register", call) == "registered" and slept == [1.0, 2.0] and len(log) == 2
    attempt, _, slept = _attempts(tries=2)
    with pytest.raises(WorkloadError, match=r"did not answer usably after 2 attempts to register \(last: OSError: down\)"):
        attempt("register", lambda: (_ for _ in ()).throw(OSError("down")))
    assert slept == [1.0]


def test_a_refusal_is_raised_at_once_without_another_try():
    attempt, _, slept = _attempts(refused=lambda exc, reason, what: ConfigError(f"refused while trying to {what}"))
    with pytest.raises(ConfigError, match="refused while trying to sign in"):
        attempt("sign in", lambda: (_ for _ in ()).throw(PermissionError("401")))
    assert slept == []
