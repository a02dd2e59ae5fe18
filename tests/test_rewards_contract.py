"""The reward-function contract, the scorer's faults, and every way of loading a reward."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rewards import (
    ENTRY_POINT_GROUP,
    ModelReward,
    RewardError,
    RewardScorer,
    format_reward_list,
    list_rewards,
    load_reward,
    parse_reward_weights,
)

ROOT = Path(__file__).resolve().parent.parent


def score(funcs, completions=("a", "b"), columns=None, **kw):
    n = len(completions)
    scorer = RewardScorer(funcs, **kw)
    return scorer.score(["p"] * n, list(completions), [[1] * (i + 1) for i in range(n)],
                        step=7, columns=columns)


# ---- the contract -------------------------------------------------------------------------------

def test_columns_completion_ids_and_step_arrive_by_name():
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(kwargs, prompts=prompts, completions=completions)
        return [1.0, 2.0]

    score([spy], columns={"answer": ["x", "y"], "level": [1, 2]})
    assert seen["answer"] == ["x", "y"] and seen["level"] == [1, 2]
    assert seen["completion_ids"] == [[1], [1, 1]] and seen["step"] == 7
    assert seen["prompts"] == ["p", "p"] and seen["completions"] == ["a", "b"]


def test_none_is_nan_and_weighted_total_ignores_it():
    def first(prompts, completions, **kw):
        return [1.0, None]

    def second(prompts, completions, **kw):
        return [2.0, None]

    def third(prompts, completions, **kw):
        return [None, 4.0]

    result = score([first, second, third], weights=[1.0, 0.5, 2.0])
    assert list(result.per_function) == ["first", "second", "third"]
    assert np.isnan(result.per_function["first"][1])
    np.testing.assert_allclose(result.total, [1.0 + 0.5 * 2.0, 8.0])
    all_none = score([lambda p, c, **k: [None, None]])
    assert np.isnan(all_none.total).all()


def test_duplicate_names_get_suffixes():
    f = load_reward("xml_tags(think)")
    g = load_reward("xml_tags(think)")
    assert list(score([f, g]).per_function) == ["xml_tags_think", "xml_tags_think_2"]


def test_async_functions_run_concurrently():
    async def slow_a(prompts, completions, **kw):
        await asyncio.sleep(0.3)
        return [1.0] * len(completions)

    async def slow_b(prompts, completions, **kw):
        await asyncio.sleep(0.3)
        return [2.0] * len(completions)

    start = time.perf_counter()
    result = score([slow_a, slow_b])
    assert time.perf_counter() - start < 0.5
    np.testing.assert_allclose(result.total, [3.0, 3.0])


def test_sync_functions_run_concurrently_too():
    def slow(prompts, completions, **kw):
        time.sleep(0.3)
        return [1.0] * len(completions)

    def slow2(prompts, completions, **kw):
        time.sleep(0.3)
        return [1.0] * len(completions)

    start = time.perf_counter()
    score([slow, slow2])
    assert time.perf_counter() - start < 0.5


def test_an_object_with_async_call_is_awaited():
    class Judge:
        __name__ = "judge"

        async def __call__(self, prompts, completions, **kw):
            await asyncio.sleep(0.01)
            return [0.5] * len(completions)

    np.testing.assert_allclose(score([Judge()]).per_function["judge"], [0.5, 0.5])


def test_scorer_works_inside_a_running_event_loop():
    async def main():
        return score([lambda p, c, **k: [1.0] * len(c)])

    np.testing.assert_allclose(asyncio.run(main()).total, [1.0, 1.0])


def test_model_reward_adapter_scores_prompt_plus_completion():
    texts = []

    def score_texts(batch):
        texts.extend(batch)
        return [len(t) for t in batch]

    rm = ModelReward(score_texts, name="rm_tiny")
    result = score([rm], completions=("ab", "abcd"))
    assert texts == ["pab", "pabcd"]
    np.testing.assert_allclose(result.per_function["rm_tiny"], [3.0, 5.0])
    loaded = load_reward("model:some/ckpt", model_loader=lambda path: ModelReward(
        lambda t: [0.0] * len(t), name=path.replace("/", "_")))
    assert loaded.__name__ == "some_ckpt"
    with pytest.raises(RewardError, match="need a backend"):
        load_reward("model:some/ckpt")


# ---- faults -------------------------------------------------------------------------------------

def flaky(prompts, completions, **kw):
    return [1.0 if c != "bad" else 1 / 0 for c in completions]


def test_raise_names_function_and_sample_index():
    with pytest.raises(RewardError, match=r"'flaky' raised ZeroDivisionError.*sample 1"):
        score([flaky], completions=("ok", "bad", "ok"))


def test_on_error_none_scores_none_for_the_failing_sample_only():
    result = score([flaky], completions=("ok", "bad", "ok"), on_error="none")
    np.testing.assert_array_equal(np.isnan(result.per_function["flaky"]), [False, True, False])


def test_hang_becomes_a_timeout_error():
    def hangs(prompts, completions, **kw):
        time.sleep(3)
        return [0.0] * len(completions)

    start = time.perf_counter()
    with pytest.raises(RewardError, match=r"'hangs' timed out after 0.2 s"):
        score([hangs], timeout_s=0.2)
    assert time.perf_counter() - start < 1.0
    result = score([hangs], timeout_s=0.2, on_error="none")
    assert np.isnan(result.total).all()


def test_async_hang_becomes_a_timeout_error():
    async def hangs_async(prompts, completions, **kw):
        await asyncio.sleep(3)

    with pytest.raises(RewardError, match="'hangs_async' timed out"):
        score([hangs_async], timeout_s=0.2)


@pytest.mark.parametrize("values, message", [
    ([1.0], r"'bad' returned 1 values for 2 completions"),
    ("ab", r"'bad' returned str"),
    ([1.0, "x"], r"'bad' returned a non-numeric value 'x' \(str\) for sample 1"),
    ([1.0, True], r"non-numeric value True"),
    ([math.nan, 1.0], r"'bad' returned nan for sample 0"),
    ([1.0, math.inf], r"'bad' returned inf for sample 1"),
])
def test_contract_violations_raise_naming_the_function(values, message):
    def bad(prompts, completions, **kw):
        return values

    for on_error in ("raise", "none"):
        with pytest.raises(RewardError, match=message):
            score([bad], on_error=on_error)


def test_numpy_values_are_accepted():
    result = score([lambda p, c, **k: np.array([0.5, 1])])
    np.testing.assert_allclose(result.total, [0.5, 1.0])


def test_bad_configuration_is_refused():
    with pytest.raises(RewardError, match="2 reward weights for 1"):
        RewardScorer([flaky], weights=[1, 2])
    with pytest.raises(RewardError, match="--reward-on-error 'skip'"):
        RewardScorer([flaky], on_error="skip")
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2"):
        score([flaky], columns={"answer": ["x"]})
    assert parse_reward_weights("1, 0.5", 2) == [1.0, 0.5]
    assert parse_reward_weights("1 0.5", 2) == [1.0, 0.5]  # the README's other form
    assert parse_reward_weights(None, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(RewardError, match="expected 2 finite numbers"):
        parse_reward_weights("1", 2)
    with pytest.raises(RewardError, match="separated by commas or spaces"):
        parse_reward_weights("1;2", 2)


# ---- loaders ------------------------------------------------------------------------------------

def test_builtin_by_name_and_with_arguments():
    assert load_reward("math_answer").__name__ == "math_answer"
    assert load_reward("xml_tags").__name__ == "xml_tags_think_answer"
    assert load_reward("xml_tags(think, answer, tool)").__name__ == "xml_tags_think_answer_tool"
    f = load_reward('format_regex("^a.*", name="starts_with_a")')
    assert f.__name__ == "starts_with_a" and f(["p"], ["ab", "ba"]) == [1.0, 0.0]
    assert load_reward("soft_overlong_punishment(max_length=10, buffer=2)")(
        [""], [""], completion_ids=[[0] * 9]) == [-0.5]
    with pytest.raises(RewardError, match="did you mean 'math_answer'"):
        load_reward("math_answr")
    with pytest.raises(RewardError, match=r"'format_regex'.*pattern"):
        load_reward("format_regex")
    with pytest.raises(RewardError, match="cannot parse the arguments"):
        load_reward("xml_tags(think answer)")


def test_file_function_loader(tmp_path):
    example = ROOT / "rewards" / "examples" / "my_reward.py"
    fn = load_reward(f"{example}:score")
    assert fn(["p", "p"], ["x = 4", "no"], answer=["4", "4"], completion_ids=[[1, 2], [3]]) == [
        pytest.approx(0.998), pytest.approx(-0.001)]
    factory_file = tmp_path / "plug.py"
    factory_file.write_text("def make(k):\n    def f(prompts, completions, **kw):\n"
                            "        return [k] * len(completions)\n    return f\n")
    assert load_reward(f"{factory_file}:make(3)")(["p"], ["c"]) == [3]


def test_file_loader_errors(tmp_path):
    with pytest.raises(RewardError, match=r"'nope/missing.py:score'.*file not found"):
        load_reward("nope/missing.py:score")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_module_xyz\n")
    with pytest.raises(RewardError, match=r"broken.py:score'.*failed to import.*not_a_real_module"):
        load_reward(f"{broken}:score")
    good = tmp_path / "good.py"
    good.write_text("def score(prompts, completions, **kw):\n    return [0.0]\nVALUE = 3\n"
                    "def no_args():\n    return []\n")
    with pytest.raises(RewardError, match=r"has no attribute 'scor'.*callables there: no_args, "
                                          r"score"):
        load_reward(f"{good}:scor")
    with pytest.raises(RewardError, match="int object is not callable"):
        load_reward(f"{good}:VALUE")
    with pytest.raises(RewardError, match=r"must accept \(prompts, completions, \*\*kwargs\)"):
        load_reward(f"{good}:no_args")


def test_dotted_loader_and_its_errors(tmp_path, monkeypatch):
    (tmp_path / "my_pkg_rw").mkdir()
    (tmp_path / "my_pkg_rw" / "__init__.py").write_text("")
    (tmp_path / "my_pkg_rw" / "scores.py").write_text(
        "def score(prompts, completions, **kw):\n    return [0.25] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_pkg_rw.scores:score")(["p"], ["c"]) == [0.25]
    with pytest.raises(RewardError, match=r"failed to import module 'my_pkg_rw.nothing'"):
        load_reward("my_pkg_rw.nothing:score")
    with pytest.raises(RewardError, match="expected a built-in name"):
        load_reward("my_pkg_rw.scores:")


def test_entry_point_loader_and_listing(tmp_path, monkeypatch):
    dist = tmp_path / "fake_reward_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-reward-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbrevity = fake_reward_mod:brevity\nbroken = fake_reward_mod:nope\n")
    (tmp_path / "fake_reward_mod.py").write_text(
        'def brevity(prompts, completions, **kw):\n    """Shorter is better."""\n'
        "    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("brevity")(["p"], ["abc"]) == [0.25]
    rows = dict(list_rewards())
    assert rows["brevity"] == "Shorter is better."
    assert rows["broken"].startswith("(failed to load")
    with pytest.raises(RewardError, match="entry point 'fake_reward_mod:nope'.*failed to load"):
        load_reward("broken")


def test_list_rewards_covers_every_builtin_with_a_description():
    rows = list_rewards()
    names = [n for n, _ in rows]
    for name in ("math_answer", "format_regex", "xml_tags", "length_penalty",
                 "soft_overlong_punishment", "json_valid", "json_schema", "code_exec"):
        assert name in names
    assert all(desc and desc != "(no description)" for _, desc in rows)
    text = format_reward_list([("a", "one"), ("long_name", "two")])
    assert text == "a          one\nlong_name  two"


def test_package_imports_neither_mlx_nor_torch():
    code = textwrap.dedent("""
        import sys
        import rewards, rewards.builtins, rewards.sandbox, rewards.code_exec
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'torch', 'mlx_lm'))
        print(bad)
        sys.exit(1 if bad else 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- functions that would end or hang the run -----------------------------------------------

class CustomStop(BaseException):
    pass


@pytest.mark.parametrize("make", [lambda: SystemExit(0), lambda: SystemExit(3),
                                  KeyboardInterrupt, GeneratorExit, CustomStop])
@pytest.mark.parametrize("is_async", [False, True])
def test_a_base_exception_stops_the_run_naming_the_function(make, is_async):
    """Regression: sys.exit(0) in a reward ended grpo with exit code 0 and no steps."""
    def quits(prompts, completions, **kw):
        raise make()

    async def quits_async(prompts, completions, **kw):
        raise make()

    fn = quits_async if is_async else quits
    for on_error in ("raise", "none"):
        with pytest.raises(RewardError, match=rf"'{fn.__name__}' raised .*BaseException.*stops"):
            score([fn], on_error=on_error)


def test_an_async_function_that_blocks_its_loop_times_out():
    """Regression: time.sleep in an async reward hung the run forever (the loop never woke)."""
    async def blocks(prompts, completions, **kw):
        time.sleep(2)  # noqa: ASYNC251 - the bug being tested
        return [0.0] * len(completions)

    start = time.perf_counter()
    with pytest.raises(RewardError, match=r"'blocks' timed out after 0.2 s"):
        score([blocks], timeout_s=0.2)
    assert time.perf_counter() - start < 1.0


def test_bad_timeouts_are_refused():
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(RewardError, match="--timeout"):
            RewardScorer([flaky], timeout_s=bad)
