"""The model server: a KServe ``ModelServer`` serving a base model with a LoRA adapter.

Run as ``python -m aiplane.plugins.kserve.server --base-model DIR --adapter DIR
--model-name NAME --host H --port P``. It serves

* the KServe v2 protocol (``/v2/models/NAME/ready``, ``/v2/models/NAME/infer``:
  a BYTES input tensor of prompts in, a BYTES output tensor ``text_output`` of
  generated texts out; request parameter ``max_tokens`` is honoured), and
* an OpenAI-style ``POST /v1/completions`` (and ``GET /v1/models``), which is what
  vLLM on OpenShift AI serves, so one client works against both.

KServe's REST server hard-codes ``host="0.0.0.0"``; this server hands uvicorn
sockets bound where it was told instead (KServe's ``RESTServer.run`` takes
sockets). The deployer binds them itself and passes them as ``--socket-fd`` (the
endpoint's port, shared with the server it replaces through ``SO_REUSEPORT``; see
``_port``) and ``--private-socket-fd`` (loopback, ephemeral, this server alone),
so the ports are known before the server starts and no other process can take
them in between. The model loads before uvicorn starts, and uvicorn calls
``listen()`` only after its lifespan startup, so neither socket accepts a
connection before the model is loaded. No gRPC server is started.

Heavy libraries are imported inside :func:`main`: ``kserve.model_server`` parses
``sys.argv`` when it is imported, so ours is cleared first.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["main"]

_GRACE_S = 5
"""Seconds uvicorn lets in-flight requests finish after SIGTERM; the deployer waits longer."""


class _Generation(BaseModel):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _TextGenerator:
    """A causal LM with a LoRA adapter applied; generates one prompt at a time, greedy by default."""

    def __init__(self, base_model: Path, adapter: Path):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, adapter).eval()
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        # torch modules are not safe to call from several threads at once.
        self._lock = threading.Lock()

    def generate(self, prompts: Sequence[str], max_tokens: int, temperature: float = 0.0) -> list[_Generation]:
        """Complete each prompt; raises ``ValueError`` for a request the model cannot serve."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        return [self._one(p, max_tokens, temperature) for p in prompts]

    def _one(self, prompt: str, max_tokens: int, temperature: float) -> _Generation:
        import torch

        tok = self.tokenizer
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if ids.shape[1] == 0:
            # generate() needs at least one token to condition on.
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = torch.tensor([[start]])
        n_prompt = int(ids.shape[1])
        if self.max_positions and n_prompt + max_tokens > self.max_positions:
            raise ValueError(
                f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.max_positions} tokens; shorten the prompt or lower max_tokens"
            )
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        eos = tok.eos_token_id
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                eos_token_id=eos,
                **sampling,
            )
        new = out[0, n_prompt:].tolist()
        finish = "length"
        if eos is not None and eos in new:
            new = new[: new.index(eos)]
            finish = "stop"
        text = tok.decode(new, skip_special_tokens=True)
        return _Generation(text=text, finish_reason=finish, prompt_tokens=n_prompt, completion_tokens=len(new))


class _CompletionRequest(BaseModel):
    """The part of the OpenAI completions request this server honours."""

    # OpenAI clients send fields this server does not use (logprobs, stop, user...).
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """0 (the default here) is greedy decoding."""
    n: int = 1
    stream: bool = False


def _openai_error(status: int, message: str, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
    )


def _openai_router(generator: _TextGenerator, model_name: str):
    """``POST /v1/completions`` and ``GET /v1/models``, shaped like vLLM's OpenAI server."""
    from fastapi import APIRouter

    router = APIRouter()

    async def completions(request: _CompletionRequest):
        if request.model != model_name:
            return _openai_error(404, f"The model `{request.model}` does not exist.", "model_not_found")
        if request.stream or request.n != 1:
            return _openai_error(400, "stream and n > 1 are not supported by this server")
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        try:
            results = await asyncio.to_thread(generator.generate, prompts, request.max_tokens, request.temperature)
        except ValueError as exc:
            return _openai_error(400, str(exc))
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                for i, r in enumerate(results)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "aiplane"}],
        }

    router.add_api_route("/v1/completions", completions, methods=["POST"])
    router.add_api_route("/v1/models", models, methods=["GET"])
    return router


def _kserve_model(generator: _TextGenerator, name: str, default_max_tokens: int):
    """A ``kserve.Model`` whose v2 ``predict`` maps a BYTES tensor of prompts to one of texts."""
    from kserve import InferOutput, InferRequest, InferResponse, Model
    from kserve.errors import InvalidInput

    class TextGenerationModel(Model):
        def load(self) -> bool:
            self.ready = True
            return self.ready

        async def predict(self, payload, headers=None, response_headers=None):
            if not isinstance(payload, InferRequest):
                raise InvalidInput("this model speaks the v2 protocol: POST /v2/models/{name}/infer")
            inputs = [i for i in payload.inputs if i.datatype == "BYTES"]
            if len(inputs) != 1:
                raise InvalidInput("send exactly one BYTES input tensor holding the prompts")
            prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in inputs[0].as_numpy().ravel()]
            params = payload.parameters or {}
            try:
                max_tokens = int(params.get("max_tokens", default_max_tokens))
                results = await asyncio.to_thread(generator.generate, prompts, max_tokens)
            except ValueError as exc:
                raise InvalidInput(str(exc)) from None
            texts = [r.text for r in results]
            out = InferOutput(name="text_output", shape=[len(texts)], datatype="BYTES", data=texts)
            return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name, infer_outputs=[out])

    model = TextGenerationModel(name)
    model.load()
    return model


def _sockets(args: argparse.Namespace) -> list[socket.socket]:
    """The bound sockets to serve on: the endpoint's, then the private one when given.

    uvicorn listens on them in this order, so once the private one answers, the
    endpoint's one listens too, and the deployer can steer the port through it.
    """
    if args.socket_fd is not None:
        public = socket.socket(fileno=args.socket_fd)
    else:
        from ._port import claim

        public, _ = claim(args.host, args.port, None, args.model_name)
    private = [] if args.private_socket_fd is None else [socket.socket(fileno=args.private_socket_fd)]
    return [public, *private]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aiplane.plugins.kserve.server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--base-model", type=Path, required=True, help="Hugging Face model directory")
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory (adapter_config.json)")
    parser.add_argument("--model-name", required=True, help="name in the URL paths and the OpenAI 'model' field")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--socket-fd", type=int, default=None, help="serve on this inherited, bound socket")
    parser.add_argument(
        "--private-socket-fd", type=int, default=None, help="also serve on this one, which reaches this server alone"
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="default generation length for v2 infer")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, then serve until SIGTERM or SIGINT."""
    args = _parse(argv)
    # kserve.model_server parses sys.argv at import time; our flags are not its flags.
    sys.argv = sys.argv[:1]

    sockets = _sockets(args)
    port = sockets[0].getsockname()[1]
    print(f"aiplane kserve server: loading {args.base_model} with adapter {args.adapter}", flush=True)
    try:
        generator = _TextGenerator(args.base_model, args.adapter)
    except Exception as exc:
        traceback.print_exc()
        # Last line of the log, so the deployer's error quotes the reason, not just a stack.
        print(
            f"aiplane kserve server: cannot load adapter {args.adapter} onto base model {args.base_model}: "
            f"{type(exc).__name__}: {exc}",
            flush=True,
        )
        return 2
    model = _kserve_model(generator, args.model_name, args.max_new_tokens)

    from kserve import ModelServer
    from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
    from kserve.model_server import app
    from kserve.protocol.rest.server import RESTServer

    server = ModelServer(http_port=port, enable_grpc=False, workers=1, enable_docs_url=False, grace_period=_GRACE_S)
    server.register_model(model)
    model.start()
    app.include_router(_openai_router(generator, args.model_name))
    rest = RESTServer(
        FASTAPI_APP_IMPORT_STRING,
        server.dataplane,
        server.model_repository_extension,
        port,
        grace_period=_GRACE_S,
    )
    from ._port import url_host

    where = " and ".join(f"http://{url_host(s.getsockname()[0])}:{s.getsockname()[1]}" for s in sockets)
    print(f"aiplane kserve server: model {args.model_name!r} serving on {where}", flush=True)
    rest.run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
