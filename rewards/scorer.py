"""Call several reward functions on one batch, check what they return, and combine them.

    scorer = RewardScorer([math_answer, xml_tags("think", "answer")], weights=[1.0, 0.2])
    scores = scorer.score(prompts, completions, completion_ids, step=3, columns={"answer": golds})
    scores.per_function["math_answer"]  # float64 [N], NaN where the function returned None
    scores.total                         # float64 [N] = nansum_f w_f * r_f; NaN if all were None

Every function is called once per batch, all of them concurrently, each in a fresh daemon thread
(an ``async def`` function on its own event loop in that thread, so one that blocks its loop --
``time.sleep`` in a coroutine -- still times out). Each call has ``timeout_s``. A thread cannot
be killed, so a hung function is abandoned (a coroutine is cancelled) and reported as a timeout;
a subprocess per call would be killable but would need every function, closure and column to be
picklable and would cost a process start per batch. Code written by the model never runs in
these threads: ``code_exec`` runs it in ``rewards.sandbox``.

Faults: a function that raises is called again one sample at a time to find the index (so it must
tolerate repeated calls); with ``on_error="raise"`` (default) a ``RewardError`` names the function
and the first failing sample; with ``on_error="none"`` failing samples score None and the others
keep their per-sample values. A timeout is the same error, without an index (the whole batch is
None under ``on_error="none"``). A wrong length, a non-numeric value, NaN or inf always raise:
they are bugs in the function, not in the sample. So does a ``BaseException`` that is not an
``Exception`` (``sys.exit``, ``KeyboardInterrupt``...): it would otherwise end the run, with exit
code 0 for ``sys.exit(0)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .contract import RESERVED_KWARGS, RewardError, RewardFunction, reward_name

ON_ERROR_CHOICES = ("raise", "none")


@dataclass(frozen=True)
class RewardScores:
    per_function: dict[str, np.ndarray]  # name -> float64 [N], NaN = not applicable
    total: np.ndarray  # float64 [N]


class _CallFailed(Exception):
    def __init__(self, cause: BaseException, timed_out: bool = False) -> None:
        super().__init__(str(cause))
        self.cause, self.timed_out = cause, timed_out


def parse_reward_weights(text: str | None, n_functions: int) -> list[float]:
    """``--reward-weights "1,0.5"`` (or ``"1 0.5"``) -> ``[1.0, 0.5]``; None -> all ones.
    Checked before loading."""
    if text is None or not text.strip():
        return [1.0] * n_functions
    try:
        weights = [float(w) for w in text.replace(",", " ").split()]
    except ValueError:
        raise RewardError(f"--reward-weights {text!r}: expected numbers separated by commas "
                          "or spaces") from None
    if len(weights) != n_functions or not all(math.isfinite(w) for w in weights):
        raise RewardError(f"--reward-weights {text!r}: expected {n_functions} finite numbers, "
                          f"one per reward function")
    return weights


def _unique_names(funcs: Sequence[RewardFunction]) -> list[str]:
    names: list[str] = []
    for fn in funcs:
        base = name = reward_name(fn)
        k = 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _is_async(fn: RewardFunction) -> bool:
    # a coroutine function, or an object whose class defines ``async def __call__``
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _invoke(fn: RewardFunction, kwargs: dict[str, Any]) -> Any:
    """``fn(prompts, completions, **rest)``: the first two positionally, whatever their names."""
    rest = {k: v for k, v in kwargs.items() if k not in ("prompts", "completions")}
    return fn(kwargs["prompts"], kwargs["completions"], **rest)


class _Carried(Exception):
    """A ``BaseException`` of a coroutine, carried past asyncio (which would re-raise
    ``SystemExit`` / ``KeyboardInterrupt`` out of the loop and leave the task unretrieved)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


async def _guarded(awaitable: Any) -> Any:
    try:
        return await awaitable
    except (Exception, asyncio.CancelledError):
        raise
    except BaseException as e:  # noqa: BLE001 - re-raised as the caller's error
        raise _Carried(e) from None


class _Call:
    """One call of a reward function in its own daemon thread; ``cancel`` stops a coroutine."""

    def __init__(self, fn: RewardFunction, kwargs: dict[str, Any]) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._cancel = None
        threading.Thread(target=self._run, args=(fn, kwargs), daemon=True,
                         name=f"reward-{reward_name(fn)}").start()

    def _run(self, fn: RewardFunction, kwargs: dict[str, Any]) -> None:
        try:
            result = self._run_async(fn, kwargs) if _is_async(fn) else _invoke(fn, kwargs)
        except _Carried as carried:
            self._settle(None, carried.error)
        except BaseException as e:  # noqa: BLE001 - SystemExit too: handed to the caller
            self._settle(None, e)
        else:
            self._settle(result, None)

    def _run_async(self, fn: RewardFunction, kwargs: dict[str, Any]) -> Any:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own loop
        try:
            task = loop.create_task(_guarded(_invoke(fn, kwargs)))
            self._cancel = lambda: loop.call_soon_threadsafe(task.cancel)
            return loop.run_until_complete(task)
        finally:
            self._cancel = None
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            try:
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _settle(self, result: Any, error: BaseException | None) -> None:
        try:
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # abandoned on timeout: nobody is waiting for this result any more

    def outcome(self, timeout_s: float) -> Any:
        """The function's return value; :class:`_CallFailed` for an error or a timeout."""
        done, _ = concurrent.futures.wait([self.future], timeout=timeout_s)
        if not done:
            cancel = self._cancel
            if cancel is not None:
                try:
                    cancel()
                except RuntimeError:  # the loop closed meanwhile
                    pass
            raise _CallFailed(TimeoutError(), timed_out=True)
        error = self.future.exception()
        if error is not None:
            raise _CallFailed(error)
        return self.future.result()


class RewardScorer:
    """Score batches with ``funcs`` and combine them with ``weights`` (see module docstring)."""

    def __init__(self, funcs: Sequence[RewardFunction], weights: Sequence[float] | None = None,
                 on_error: str = "raise", timeout_s: float = 60.0) -> None:
        if not funcs:
            raise RewardError("at least one reward function is needed")
        if on_error not in ON_ERROR_CHOICES:
            raise RewardError(f"--reward-on-error {on_error!r}: choose one of {ON_ERROR_CHOICES}")
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                and timeout_s > 0):
            raise RewardError(f"--timeout {timeout_s!r}: must be a finite number of seconds > 0")
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise RewardError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
        self.funcs, self.weights = list(funcs), weights
        self.names = _unique_names(self.funcs)
        self.on_error, self.timeout_s = on_error, timeout_s

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              completion_ids: Sequence[Sequence[int]] | None = None, step: int = 0,
              columns: dict[str, Sequence[Any]] | None = None) -> RewardScores:
        n = len(completions)
        columns = dict(columns or {})
        for key, values in columns.items():
            if key in RESERVED_KWARGS:
                raise RewardError(f"dataset column {key!r} clashes with a reward-function argument")
            if len(values) != n:
                raise RewardError(f"column {key!r} has {len(values)} values for {n} completions")
        if len(prompts) != n:
            raise RewardError(f"{len(prompts)} prompts for {n} completions")
        kwargs = {"prompts": list(prompts), "completions": list(completions),
                  "completion_ids": None if completion_ids is None else list(completion_ids),
                  "step": step, **{k: list(v) for k, v in columns.items()}}
        calls = [_Call(fn, kwargs) for fn in self.funcs]  # all at once: they run concurrently
        rows = [self._score_one(fn, name, call, kwargs, n)
                for fn, name, call in zip(self.funcs, self.names, calls)]
        per_function = {name: np.array(r, dtype=np.float64) for name, r in zip(self.names, rows)}
        stacked = np.stack(list(per_function.values()))  # [F, N]
        weighted = stacked * np.asarray(self.weights, dtype=np.float64)[:, None]
        total = np.where(np.isnan(stacked).all(axis=0), np.nan, np.nansum(weighted, axis=0))
        return RewardScores(per_function, total)

    def _score_one(self, fn: RewardFunction, name: str, call: _Call, kwargs: dict[str, Any],
                   n: int) -> list[float]:
        try:
            return _check(name, call.outcome(self.timeout_s), n)
        except _CallFailed as failed:
            _refuse_run_enders(name, failed.cause)
            if failed.timed_out:
                if self.on_error == "none":
                    return [math.nan] * n
                raise RewardError(f"reward function {name!r} timed out after {self.timeout_s:g} s "
                                  f"on a batch of {n}") from None
            return self._per_sample(fn, name, kwargs, n, failed.cause)

    def _per_sample(self, fn: RewardFunction, name: str, kwargs: dict[str, Any], n: int,
                    batch_error: BaseException) -> list[float]:
        values: list[float] = []
        for i in range(n):
            one = {k: (v[i:i + 1] if isinstance(v, list) else v) for k, v in kwargs.items()}
            try:
                values += _check(name, _Call(fn, one).outcome(self.timeout_s), 1)
            except _CallFailed as failed:
                _refuse_run_enders(name, failed.cause)
                if self.on_error == "none":
                    values.append(math.nan)
                    continue
                what = "timed out" if failed.timed_out else f"raised {failed.cause!r}"
                raise RewardError(f"reward function {name!r} {what} on sample {i} "
                                  f"(found by calling it once per sample)") from failed.cause
        if self.on_error == "raise":  # the batch failed but no single sample does
            raise RewardError(f"reward function {name!r} raised {batch_error!r} on the batch of "
                              f"{n}, but on no single sample") from batch_error
        return values


def _refuse_run_enders(name: str, cause: BaseException) -> None:
    """``SystemExit``, ``KeyboardInterrupt`` and other non-``Exception`` errors would end the run
    (with exit code 0 for ``sys.exit(0)``): stop it instead, naming the function, whatever
    ``--reward-on-error`` says."""
    if not isinstance(cause, Exception):
        raise RewardError(f"reward function {name!r} raised {cause!r} (a BaseException, which "
                          "would end the run); the run stops") from None


def _check(name: str, values: Any, n: int) -> list[float]:
    """Return ``values`` as floats with None -> NaN, or raise naming the function."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}; "
                          f"expected a list of {n} floats or None")
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for "
                          f"{n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise RewardError(f"reward function {name!r} returned a non-numeric value {v!r} "
                              f"({type(v).__name__}) for sample {i}")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward function {name!r} returned {float(v)} for sample {i}; "
                              f"use None for 'not applicable'")
        out.append(float(v))
    return out
