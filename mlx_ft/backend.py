"""MLXBackend: the Backend protocol (algorithms/backend.py) on MLX.

The device and dtype are chosen once and printed with the reason. Gradients of micro-batches are
summed until ``optimizer_step``, which clips by global norm and applies AdamW with bias
correction (the same update as ``torch.optim.AdamW``). The system OpenBLAS was loaded by
``mlx_ft/__init__`` before ``mlx.core`` is imported here.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from algorithms.adapter_io import check_init_adapter, deltas, stack
from algorithms.backend import (
    VALUE_HEAD_KEYS,
    ForwardShortcuts,
    Loss,
    as_loss,
    attention_allowed,
    check_outputs,
    loss_view,
    save_value_head,
    value_head_init,
    with_head_mask,
)
from algorithms.distributed import current, is_empty
from algorithms.weight_decay import decayed_names
from converters.fingerprint import write_base_record

from . import blas, precise
from . import model as mlx_model
from .logprobs import model_outputs
from .ops import MLXOps
from .reference import Reference, load_frozen

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def choose_device(dtype: str) -> tuple[Any, str]:
    gpu = mx.metal.is_available() if hasattr(mx, "metal") else False
    gpu = gpu or (hasattr(mx, "cuda") and mx.cuda.is_available())
    device = mx.default_device()
    name = "gpu" if device.type == mx.DeviceType.gpu else "cpu"
    resolved = dtype if dtype != "auto" else ("bfloat16" if gpu and name == "gpu" else "float32")
    why = "Metal/CUDA GPU" if name == "gpu" else "no MLX GPU backend"
    lib = f"; OpenBLAS from {blas.loaded_from}" if blas.loaded_from else ""
    print(f"mlx_ft: device={name} dtype={resolved} ({why}{lib})", file=sys.stderr)
    if name == "gpu" and hasattr(mx, "metal") and mx.metal.is_available():
        limit = mx.metal.device_info().get("max_recommended_working_set_size")
        if limit and hasattr(mx, "set_wired_limit"):
            mx.set_wired_limit(limit)
    if name == "cpu":
        # Freed buffers go straight back to the OS: ~0.2 GB less peak RSS on SmolLM2 LoRA, no
        # measured slowdown (benchmarks/RESULTS.md).
        mx.set_cache_limit(0)
    return _DTYPES[resolved], resolved


def _temperature(batch: dict) -> float:
    """The logit temperature a batch is scored at (online RL: the sampling temperature)."""
    return float(batch["temperature"]) if "temperature" in batch else 1.0


class MLXBackend(ForwardShortcuts):
    name = "mlx"

    def __init__(self, cfg: Any, model_path: Path, tokenizer: Any):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model_path = Path(model_path)
        self.ops = MLXOps()
        mx.random.seed(cfg.seed)
        self.dtype, self.dtype_name = choose_device(cfg.dtype)
        self.model, self.model_config = mlx_model.load_model(self.model_path, self.dtype)
        mlx_model.quantize_base(self.model, self.model_config, cfg)
        self.adapter_config = mlx_model.attach_adapters(self.model, cfg)
        self.init_adapter = check_init_adapter(cfg, self.model_path)
        if self.init_adapter is not None:  # frozen under the new adapter (adapter_io)
            mlx_model.stack_frozen_adapter(self.model, deltas(self.init_adapter), self.dtype)
        self.value_head = self._make_value_head() if cfg.uses_value_head else None
        self.optimizer = optim.AdamW(
            learning_rate=cfg.learning_rate, betas=[cfg.adam_beta1, cfg.adam_beta2],
            eps=cfg.adam_epsilon, weight_decay=0.0, bias_correction=True,
        )  # weight decay is applied in optimizer_step, to the tensors algorithms.weight_decay names
        self.reference = Reference(self.model, cfg, self.model_path, self.dtype)
        # distillation: the frozen teacher (the teacher_divergence output, teacher sampling)
        self.teacher = load_frozen(cfg.teacher, self.dtype) if getattr(cfg, "teacher", "") \
            else None
        self._grads = None
        self._micro_batches = 0  # dropout is re-seeded from (seed, this count): resumable RNG
        self.world = current()  # several processes: gradients summed in optimizer_step
        self._value_and_grad = nn.value_and_grad(self.model, self._loss)
        self._updates: dict[bool, object] = {}  # compiled optimiser updates, by "clips"

    def _make_value_head(self) -> nn.Linear:
        """``V(h) = w . h + b`` on the final hidden state, float32, initialised from the seed
        like the torch backend's (algorithms.backend.value_head_init); attached to the model as
        ``v_head`` so the optimiser, the gradients and the checkpoints carry it."""
        hidden = int(self.model_config["hidden_size"])
        init = value_head_init(self.cfg.seed, hidden)
        if self.init_adapter is not None and self.init_adapter.value_head is not None:
            init = self.init_adapter.value_head  # continue from the initial adapter's head
        head = nn.Linear(hidden, 1)
        head.update({"weight": mx.array(init["v_head.weight"]),
                     "bias": mx.array(init["v_head.bias"])})
        self.model.v_head = head
        return head

    # --- forward --------------------------------------------------------------------------
    def _outputs(self, arrays: dict, host: dict, wanted: dict[str, bool],
                 model: nn.Module | None = None, train: bool = False) -> dict[str, mx.array]:
        # Padding-free and fused-head fast paths where they apply (mlx_ft.logprobs);
        # ``train`` marks the pass whose gradient is taken.
        return model_outputs(self.model if model is None else model, arrays, host,
                             self.cfg.logprob_chunk_size, _temperature(host), wanted, train,
                             self.value_head, self.teacher)

    def _loss(self, arrays: dict, host: dict, loss: Loss, train: bool = False):
        outputs = self._outputs(arrays, host, dict(loss.outputs), train=train)
        return loss(self.ops, outputs, loss_view(arrays))

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict:
        """Every numeric array on the device (labels, reference log-probs, masks... all reach
        the loss), plus the private ``_allowed`` attention mask the decoder needs."""
        out = {k: mx.array(v) for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
        out["_allowed"] = attention_allowed(batch["segment_ids"])
        return out

    def forward_backward(self, batch: dict[str, np.ndarray], loss: Loss) -> dict[str, float]:
        self.model.train()
        # MLX's global RNG state cannot be restored, so make it a function of the position in
        # the run instead: a resumed run draws the same dropout masks as an uninterrupted one.
        draw = self.cfg.seed * 1_000_003 + self._micro_batches
        mx.random.seed(draw if self.world.size == 1 else (draw * 7919 + self.world.rank) % 2**32)
        self._micro_batches += 1
        if is_empty(batch):  # this rank's empty share of a micro-batch
            return {}
        loss = as_loss(loss)
        batch = with_head_mask(batch, loss.positions)
        (value, metrics), grads = self._value_and_grad(self._to_device(batch), batch, loss,
                                                       True)
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        mx.eval(value, metrics, self._grads)
        return {"loss": value.item(), **{k: v.item() for k, v in metrics.items()}}

    def evaluate(self, batch: dict[str, np.ndarray], loss: Loss) -> dict[str, float]:
        self.model.eval()
        if is_empty(batch):
            return {}
        loss = as_loss(loss)
        batch = with_head_mask(batch, loss.positions)
        value, metrics = self._loss(self._to_device(batch), batch, loss)
        mx.eval(value, metrics)
        return {"loss": value.item(), **{k: v.item() for k, v in metrics.items()}}

    def forward(self, batch: dict[str, np.ndarray], outputs: Iterable[str],
                reference: bool = False) -> dict[str, np.ndarray]:
        """The named outputs without gradients or dropout (see algorithms.backend)."""
        names = check_outputs(outputs, self.value_head is not None and not reference,
                              self.teacher is not None and not reference)
        self.model.eval()
        if is_empty(batch):
            return {k: np.zeros(np.shape(batch["input_ids"]), np.float32) for k in names}
        wanted = dict.fromkeys(names, False)
        arrays = self._to_device(batch)
        if reference:
            with self.reference.model() as ref:
                out = self._outputs(arrays, batch, wanted, ref)
                mx.eval(out)
        else:
            out = self._outputs(arrays, batch, wanted)
            mx.eval(out)
        return {k: np.array(v.astype(mx.float32)) for k, v in out.items()}

    # --- update ---------------------------------------------------------------------------
    def optimizer_step(self, learning_rate: float, max_grad_norm: float) -> float:
        if self._grads is None and self.world.size > 1:  # every share of this rank was empty
            self._grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        if self._grads is None:
            raise RuntimeError("optimizer_step called before forward_backward")
        grads = self._grads
        if self.world.size > 1:  # data parallel: every rank's gradients, summed
            from .distributed import sum_gradients

            grads = sum_gradients(grads, self.world)
        update = self._updates.get(max_grad_norm > 0)
        if update is None:
            update = self._updates[max_grad_norm > 0] = self._compiled_update(max_grad_norm > 0)
        norm = update(grads, mx.array(learning_rate, dtype=mx.float32),
                      mx.array(max_grad_norm, dtype=mx.float32))
        mx.eval(self.model.parameters(), self.optimizer.state, norm)
        self._grads = None
        return norm.item()

    def _compiled_update(self, clip: bool):
        """``update(grads, lr, max_norm) -> grad norm``: clip by global norm (when ``clip``),
        decay, AdamW, compiled once per run with the model and optimiser state as its implicit
        inputs and outputs: a few fused kernels instead of ~10 ops per trainable tensor."""

        def update(grads, learning_rate, max_norm):
            norm = precise.global_norm(g for _, g in tree_flatten(grads))
            if clip:
                scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
                grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
            self.optimizer.learning_rate = learning_rate
            self._decay_weights(learning_rate)
            self.optimizer.update(self.model, grads)
            return norm

        self.optimizer.init(self.model.trainable_parameters())  # the state exists before the trace
        state = [self.model.state, self.optimizer.state]
        return mx.compile(update, inputs=state, outputs=state)

    def _decay_weights(self, learning_rate: mx.array) -> None:
        """Decoupled weight decay ``p <- p * (1 - lr * wd)`` (what AdamW does next to the Adam
        step) on the trainable tensors that are neither biases nor norm weights."""
        if self.cfg.weight_decay <= 0:
            return
        factor = 1.0 - learning_rate * self.cfg.weight_decay
        params = mlx_model.trainable(self.model)
        names = decayed_names(params, self.cfg.decay_norms_and_biases)
        self.model.update(tree_unflatten([(n, (params[n] * factor).astype(params[n].dtype))
                                          for n in names]))

    # --- state ----------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        return mlx_model.to_canonical(mlx_model.trainable(self.model), self.cfg.fine_tune_type)

    def save_state(self, directory: str | None) -> None:
        """Distributed: every rank calls it; rank 0 (the others pass None) writes."""
        if directory is None:
            return
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(d / "trainable.safetensors"), mlx_model.trainable(self.model))
        opt = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(d / "optimizer.safetensors"), opt)
        (d / "mlx_state.json").write_text(json.dumps({"micro_batches": self._micro_batches}))

    def load_state(self, directory: str) -> None:
        d = Path(directory)
        weights = mx.load(str(d / "trainable.safetensors"))
        expected = set(mlx_model.trainable(self.model))
        if set(weights) != expected:
            raise ValueError(f"--resume: {d} holds other trainable parameters than this model "
                             f"({len(weights)} vs {len(expected)}); same --fine-tune-type?")
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(d / "optimizer.safetensors")).items()))
        self._updates.clear()  # the compiled updates hold the replaced state
        self._micro_batches = json.loads((d / "mlx_state.json").read_text())["micro_batches"]
        mx.eval(self.model.parameters(), self.optimizer.state)

    def save_adapters(self, directory: str) -> None:
        """mlx-lm's adapter format: ``adapters.safetensors`` + ``adapter_config.json`` (and the
        run's ``chat_template.jinja``); the value head beside them when the run has one."""
        from algorithms.data.templates import save_chat_template

        if directory is None:  # a rank other than 0: rank 0 writes
            return
        d = Path(directory)
        save_chat_template(d, self.tokenizer)
        weights = mlx_model.trainable(self.model)
        if self.cfg.fine_tune_type == "full":
            return self._save_model_dir(d, weights)
        adapters = {k: v for k, v in weights.items() if k not in VALUE_HEAD_KEYS}
        config = {**self.adapter_config, "base_model": str(self.model_path),
                  "lora_alpha": self.cfg.lora_alpha}
        if self.init_adapter is not None:  # one LoRA of rank r1 + r2 (adapter_io.stack)
            trained = {k: v for k, v in self.trainable_parameters().items()
                       if not k.startswith("v_head.")}
            stacked = stack(self.init_adapter, trained, self.cfg.lora_rank,
                            self.cfg.lora_alpha / self.cfg.lora_rank)
            adapters = dict(mlx_model.from_canonical(stacked))
            rank = self.cfg.lora_rank + self.init_adapter.rank
            keys = sorted({k.rsplit(".", 1)[0].split(".", 3)[3] for k in stacked})
            params = {**config["lora_parameters"], "rank": rank, "keys": keys}
            config = {**config, "lora_parameters": params,
                      "lora_alpha": params["scale"] * rank,
                      "init_adapter": str(self.init_adapter.path)}
        mx.save_safetensors(str(d / "adapters.safetensors"), adapters)
        if self.value_head is not None:
            save_value_head(d, {k: np.array(weights[k].astype(mx.float32))
                                for k in VALUE_HEAD_KEYS})
        (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_base_record(d, self.model_path)  # fuse refuses it on another base

    def _save_model_dir(self, d: Path, weights: dict) -> None:
        """A full fine-tune as a complete mlx-lm model dir: weights, config, tokenizer and chat
        template (``mlx_lm.load`` runs it; ``converters mlx-to-hf`` converts it)."""
        from mlx_lm.utils import save_config, save_model

        head = self.model.pop("v_head", None)  # not a weight mlx-lm's model has
        try:
            save_model(d, self.model, donate_model=False)
        finally:
            if head is not None:
                self.model.v_head = head
        config = {k: v for k, v in self.model_config.items() if k not in ("quantization",
                                                                           "quantization_config")}
        save_config(config, d / "config.json")
        self.tokenizer.save_pretrained(str(d))
        if self.value_head is not None:
            save_value_head(d, {k: np.array(weights[k].astype(mx.float32))
                                for k in VALUE_HEAD_KEYS})

    def load_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Canonical adapter weights (algorithms.adapter_io) into the adapter layers; modules
        the weights do not name keep their initial (zero) adapter."""
        mine = mlx_model.to_canonical(mlx_model.trainable(self.model), self.cfg.fine_tune_type)
        for name, value in weights.items():
            if name not in mine or mine[name].shape != value.shape:
                raise ValueError(f"--adapter: {name} {tuple(value.shape)} does not fit this "
                                 f"model's adapter layers ({mine.get(name, np.empty(0)).shape})")
        self.model.load_weights(mlx_model.from_canonical(weights), strict=False)
        mx.eval(self.model.parameters())

    # --- generation and resources ---------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int) -> str:
        from mlx_lm.generate import generate as mlx_generate
        from mlx_lm.tokenizer_utils import TokenizerWrapper

        from algorithms.data import render_prompt

        self.model.eval()
        ids = render_prompt(self.tokenizer, prompt)
        wrapper = TokenizerWrapper(self.tokenizer)
        return mlx_generate(self.model, wrapper, prompt=ids, max_tokens=max_tokens, verbose=False)

    def sample(self, prompts: list[list[int]], params: Any, seed: int | list[int]) -> list:
        """Sampled completions (``algorithms.rl.sampling.Completion``), one per prompt, in
        order; batched with a KV cache (see mlx_ft.rollout); one seed per prompt makes each
        completion independent of the others in the call."""
        from algorithms.rl.sampling import stop_token_ids

        from .rollout import sample

        eos_ids = stop_token_ids(self.tokenizer, self.model_path)
        with self._sampler_model(params) as model:
            return sample(model, self.tokenizer, prompts, params, seed, eos_ids)

    @contextlib.contextmanager
    def _sampler_model(self, params: Any) -> Iterator[Any]:
        """The model ``params.source`` names (see Backend.sample)."""
        from .rollout import GeometricMixture

        if params.source == "reference":
            with self.reference.model() as ref:
                yield ref
        elif params.source == "mixture":
            yield GeometricMixture(self.model, self.reference.model, params.mixture_coef)
        elif params.source == "teacher":
            if self.teacher is None:
                raise ValueError("sampling from the teacher needs a run with --teacher")
            yield self.teacher
        else:
            yield self.model

    def peak_memory_bytes(self) -> int:
        """The larger of MLX's allocator peak and the process's peak resident set."""
        return max(self.memory_stats().values())

    def memory_stats(self) -> dict[str, int]:
        """Peak bytes by kind: MLX's allocator peak and the process's peak resident set."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"mlx_peak": int(mx.get_peak_memory()), "peak_rss": int(rss)}
