"""TorchBackend: the :class:`algorithms.backend.Backend` protocol on transformers + PEFT.

The algorithm layer hands numpy batches (layout in :mod:`algorithms.backend`) and a loss written
against the array-ops shim; this class turns them into tensors, runs the decoder, computes
per-token log-probs chunk by chunk (:mod:`cuda_ft.logprobs`), and owns the AdamW step and the
checkpoints (their files: :mod:`cuda_ft.checkpoint`). Choices that decide numbers follow the
MLX backend: attention from ``attention_allowed`` (packed documents isolated), contiguous
position ids, LoRA init from ``lora_a_init``, clipping by global norm with
``min(1, max_norm / (norm + 1e-6))``, and AdamW with bias correction and decoupled weight decay.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from algorithms.adapter_io import check_init_adapter, deltas
from algorithms.backend import (
    HEAD_MASK,
    ForwardShortcuts,
    Loss,
    as_loss,
    attention_allowed,
    check_outputs,
    head_rows,
    loss_view,
    value_head_init,
    with_head_mask,
)
from algorithms.distributed import current, is_empty
from algorithms.weight_decay import decayed_names

from . import checkpoint, varlen
from .device import choose_device
from .distributed import Parallel, full, shard_like
from .kernel_patch import head_impl
from .logprobs import selected_head_outputs
from .model import canonical_parameters, load_model, set_adapter_training
from .ops import TorchOps
from .reference import Reference, load_frozen


class TorchBackend(ForwardShortcuts):
    """A transformers causal LM with its adapters (and value head) and AdamW, on CUDA or CPU."""

    name = "torch"

    def __init__(self, cfg: Any, model_path: Path, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model_path = Path(model_path)
        self.choice = choose_device(cfg.dtype)
        self.device = self.choice.device
        self.ops = TorchOps(self.device)
        torch.manual_seed(cfg.seed)
        self.init_adapter = check_init_adapter(cfg, self.model_path)
        init = deltas(self.init_adapter) if self.init_adapter is not None else None
        self.model = load_model(cfg, self.model_path, self.choice, init)
        # the HF model inside the PEFT wrapper (PEFT swaps layers in place, so it holds them)
        self.hf_model = self.model if cfg.fine_tune_type == "full" else self.model.get_base_model()
        self.params = canonical_parameters(self.model)
        self.value_head = self._make_value_head() if cfg.uses_value_head else None
        self.reference = Reference(self.model, self.hf_model, cfg, self.model_path, self.choice)
        # distillation: the frozen teacher (the teacher_divergence output, teacher sampling)
        self.teacher = load_frozen(cfg.teacher, self.choice) if getattr(cfg, "teacher", "") \
            else None
        self.parallel = Parallel(self, current())  # DDP / FSDP2 under torchrun (may reshard params)
        # Weight decay on all but biases and norm weights (algorithms.weight_decay): two groups.
        decayed = set(decayed_names(self.params, cfg.decay_norms_and_biases))
        groups = [{"params": [p for n, p in self.params.items() if n in decayed],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in self.params.items() if n not in decayed],
                   "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        )

    def _make_value_head(self) -> torch.nn.Linear:
        """``V(h) = w . h + b`` on the final hidden state, float32, initialised from the seed
        like the MLX backend's (algorithms.backend.value_head_init); trained with the policy."""
        hidden_size = self.hf_model.get_output_embeddings().weight.shape[1]
        head = torch.nn.Linear(hidden_size, 1)
        init = value_head_init(self.cfg.seed, hidden_size)
        if self.init_adapter is not None and self.init_adapter.value_head is not None:
            init = self.init_adapter.value_head  # continue from the initial adapter's head
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(init["v_head.weight"]))
            head.bias.copy_(torch.from_numpy(init["v_head.bias"]))
        head.to(self.device)
        self.params["v_head.weight"], self.params["v_head.bias"] = head.weight, head.bias
        return head

    # forward --------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        """Lower-precision matmuls when the compute dtype is not float32 (master weights fp32)."""
        if self.choice.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.choice.dtype)

    def _to_tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """numpy -> tensors on the device: floats float32, integers int64, bools bool."""
        out: dict[str, torch.Tensor] = {}
        for key, value in batch.items():
            array = np.asarray(value)
            if array.dtype == np.bool_:
                tensor = torch.from_numpy(array.copy())
            elif np.issubdtype(array.dtype, np.integer):
                tensor = torch.from_numpy(array.astype(np.int64))
            elif np.issubdtype(array.dtype, np.floating):
                tensor = torch.from_numpy(array.astype(np.float32))
            else:
                continue  # strings or objects (prompts, ids) are for the loop, not the loss
            out[key] = tensor.to(self.device)
        return out

    def _attention_mask(self, segment_ids: np.ndarray | None) -> torch.Tensor | None:
        """Additive ``[B, 1, T, T]`` mask isolating packed documents, or None for plain causal.

        transformers passes a 4D mask through untouched to the attention function; an additive
        float mask (0 = attend, dtype-min = blocked) works for both the sdpa and eager paths.
        """
        if segment_ids is None:
            return None
        allowed = attention_allowed(np.asarray(segment_ids))
        if allowed is None:
            return None
        dtype = self.choice.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)
        return mask[:, None].to(self.device)

    def _hidden(self, batch: dict[str, np.ndarray], tensors: dict[str, torch.Tensor],
                hf_model: torch.nn.Module) -> torch.Tensor:
        """The decoder's final hidden states ``[B, T, H]`` (packed documents isolated)."""
        input_ids = tensors["input_ids"]
        position_ids = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)
        return hf_model.get_decoder()(
            input_ids=input_ids,
            attention_mask=self._attention_mask(batch.get("segment_ids")),
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state

    def _outputs(self, batch: dict[str, np.ndarray], tensors: dict[str, torch.Tensor],
                 wanted: dict[str, bool], hf_model: torch.nn.Module | None = None,
                 ) -> dict[str, torch.Tensor]:
        """The ``wanted`` outputs (name -> with gradient), float32 ``[B, T]``, from one decoder
        pass and one chunked pass over the vocabulary (:func:`cuda_ft.logprobs.head_outputs`).

        Padding-free (:mod:`cuda_ft.varlen`) where the model family allows: only real tokens
        are run, padding positions get 0. The head is the fused one where it applies
        (Triton or torch per ``--kernels``, :func:`cuda_ft.logprobs.head_outputs`).
        """
        hf_model = self.hf_model if hf_model is None else hf_model
        head = hf_model.get_output_embeddings()
        temperature = float(batch.get("temperature", 1.0))
        shape = tuple(np.asarray(batch["input_ids"]).shape)
        with self._autocast():
            if varlen.enable(hf_model):
                ids, positions, targets, spans, where, gather = varlen.flatten(batch,
                                                                               self.device)
                hidden = hf_model.get_decoder()(input_ids=ids, position_ids=positions,
                                                use_cache=False,
                                                posttrain_spans=spans).last_hidden_state[0]
                if gather is not None:  # shared prefixes back to one row per document
                    hidden = hidden[gather]
            else:
                hidden = self._hidden(batch, tensors, hf_model)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                targets, where = tensors["targets"].reshape(-1), None
            flat = selected_head_outputs(hidden, head, targets, self.cfg.logprob_chunk_size,
                                         temperature, wanted, head_impl(self.model),
                                         head_rows(varlen.flat_values(batch.get(HEAD_MASK), where)))
            if "teacher_divergence" in wanted:
                flat["teacher_divergence"] = self._teacher_divergence(
                    batch, tensors, hidden, head, where, temperature,
                    wanted["teacher_divergence"])
        if "values" in wanted:
            values = self.value_head(hidden.float()).squeeze(-1)
            flat["values"] = values if wanted["values"] else values.detach()
        if where is None:
            return {k: v.reshape(shape) for k, v in flat.items()}
        return {k: torch.zeros(shape, dtype=v.dtype, device=self.device).index_put(where, v)
                for k, v in flat.items()}

    def _teacher_divergence(self, batch: dict[str, np.ndarray], tensors: dict,
                            hidden: torch.Tensor, head: torch.nn.Module, where: Any,
                            temperature: float, grad: bool) -> torch.Tensor:
        """GKD's per-token divergence against the teacher (:mod:`cuda_ft.divergence`), in the
        token order of the student's ``hidden``: the teacher's padded pass, flattened, or
        gathered at the real tokens (``where``) of the padding-free path."""
        from .divergence import teacher_divergence

        with torch.no_grad():
            t_hidden = self._hidden(batch, tensors, self.teacher)
            t_hidden = t_hidden.reshape(-1, t_hidden.shape[-1]) if where is None \
                else t_hidden[where]
        grad = grad and torch.is_grad_enabled()
        out = teacher_divergence(hidden, head, t_hidden, self.teacher.get_output_embeddings(),
                                 self.cfg.logprob_chunk_size, temperature,
                                 float(batch["jsd_beta"]), grad)
        return out if grad else out.detach()

    def _loss(self, batch: dict[str, np.ndarray], loss: Loss,
              train: bool = False) -> tuple[torch.Tensor, dict]:
        batch = with_head_mask(batch, loss.positions)
        tensors = self._to_tensors(batch)
        if "num_items" in tensors:
            tensors["num_items"] = tensors["num_items"].reshape(())
        wanted = dict(loss.outputs)
        outputs = self.parallel.train_outputs(batch, tensors, wanted) if train else \
            self.parallel.outputs(batch, tensors, wanted, False)
        return loss(self.ops, outputs, loss_view(tensors))

    def _metrics(self, loss: torch.Tensor, metrics: dict) -> dict[str, float]:
        return {"loss": self.ops.to_float(loss),
                **{k: self.ops.to_float(v) for k, v in metrics.items()}}

    def forward_backward(self, batch: dict[str, np.ndarray], loss: Loss) -> dict[str, float]:
        """Loss of one micro-batch; its gradients are added to those already accumulated
        (under DDP / FSDP2 averaged over ranks: the loss, a share of the global step, is scaled
        by the world size first). An empty batch (a rank's empty share) returns {}."""
        set_adapter_training(self.model, True)
        if is_empty(batch):
            self.parallel.empty_pass(dict(as_loss(loss).outputs), batch)
            return {}
        value, metrics = self._loss(batch, as_loss(loss), train=True)
        (value * self.parallel.loss_scale()).backward()
        return self._metrics(value, metrics)

    def evaluate(self, batch: dict[str, np.ndarray], loss: Loss) -> dict[str, float]:
        set_adapter_training(self.model, False)
        with torch.no_grad():
            if is_empty(batch):
                self.parallel.empty_pass(dict(as_loss(loss).outputs), batch)
                return {}
            value, metrics = self._loss(batch, as_loss(loss))
        return self._metrics(value, metrics)

    def forward(self, batch: dict[str, np.ndarray], outputs: Iterable[str],
                reference: bool = False) -> dict[str, np.ndarray]:
        """The named outputs without gradients or dropout (see algorithms.backend)."""
        names = check_outputs(outputs, self.value_head is not None and not reference,
                              self.teacher is not None and not reference)
        set_adapter_training(self.model, False)
        with torch.no_grad():
            if is_empty(batch):
                self.parallel.empty_pass(dict.fromkeys(names, False), batch)
                return {k: np.zeros(np.shape(batch["input_ids"]), np.float32) for k in names}
            out = self.parallel.outputs(batch, self._to_tensors(batch),
                                        dict.fromkeys(names, False), reference)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    # optimiser ------------------------------------------------------------------------------
    def optimizer_step(self, learning_rate: float, max_grad_norm: float) -> float:
        """Clip by global L2 norm, AdamW step, zero grads; returns the norm before clipping.

        A parameter that got no gradient is stepped with a zero gradient (as MLX does), so
        momentum and weight decay still apply to it.
        """
        params = list(self.params.values())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm_value = self.parallel.grad_norm(params)
        if max_grad_norm > 0:
            scale = min(1.0, max_grad_norm / (norm_value + 1e-6))
            if scale < 1.0:
                for p in params:
                    p.grad.mul_(scale)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm_value

    # parameters and checkpoints ---------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        # A copy: on CPU, .numpy() of an fp32 tensor would alias the live parameter.
        # (FSDP2: gathered whole, a collective)
        return {k: full(p.detach()).float().cpu().numpy().copy() for k, p in self.params.items()}

    def save_state(self, directory: str | None) -> None:
        checkpoint.save_state(self, directory)

    def load_state(self, directory: str) -> None:
        checkpoint.load_state(self, directory)

    def save_adapters(self, directory: str | None) -> None:
        checkpoint.save_adapters(self, directory)

    def load_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Canonical adapter weights (algorithms.adapter_io) into the PEFT layers; modules the
        weights do not name keep their initial (zero) adapter."""
        with torch.no_grad():
            for name, value in weights.items():
                param = self.params.get(name)
                if param is None or tuple(param.shape) != value.shape:
                    shape = None if param is None else tuple(param.shape)
                    raise ValueError(f"--adapter: {name} {value.shape} does not fit this "
                                     f"model's adapter layers ({shape})")
                param.copy_(shard_like(torch.from_numpy(value), param))

    # generation and memory ---------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int) -> str:
        """Greedy reply to one user message; only the new tokens, special tokens skipped."""
        from algorithms.data import render_prompt

        tok = self.tokenizer
        ids = torch.tensor([render_prompt(tok, prompt)], device=self.device)
        eos = self.hf_model.generation_config.eos_token_id
        eos = tok.eos_token_id if eos is None else eos
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        set_adapter_training(self.model, False)
        with torch.no_grad(), self._autocast(), self.parallel.gathered():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=pad, synced_gpus=False,
            )
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    def sample(self, prompts: list[list[int]], params: Any, seed: int | list[int]) -> list:
        """Sampled completions (``algorithms.rl.sampling.Completion``), one per prompt, in
        order; a KV-cached decode loop on the adapted model (see cuda_ft.rollout); one seed
        per prompt makes each completion independent of the others in the call."""
        from algorithms.rl.sampling import stop_token_ids

        from .rollout import sample

        eos_ids = stop_token_ids(self.tokenizer, self.model_path)
        with contextlib.ExitStack() as stack:
            if params.source == "reference":
                model = stack.enter_context(self.reference.model())
            elif params.source == "teacher":
                if self.teacher is None:
                    raise ValueError("sampling from the teacher needs a run with --teacher")
                model = self.teacher
            else:  # the policy; for "mixture", beside the reference (cuda_ft.rollout)
                stack.enter_context(self.parallel.gathered())
                model = self.model
            return sample(model, self.tokenizer, prompts, params, seed, eos_ids, self.device,
                          self._autocast(), reference=self.reference.model)

    def peak_memory_bytes(self) -> int:
        """CUDA peak allocated bytes on a GPU, else the process's peak resident set size."""
        stats = self.memory_stats()
        return stats.get("cuda_peak", stats["peak_rss"])

    def memory_stats(self) -> dict[str, int]:
        """Peak bytes by kind: the process's peak resident set, and torch's CUDA peak allocated."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stats = {"peak_rss": int(peak if sys.platform == "darwin" else peak * 1024)}  # KiB on Linux
        if self.device.type == "cuda":
            stats["cuda_peak"] = int(torch.cuda.max_memory_allocated(self.device))
        return stats
