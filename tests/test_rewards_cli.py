"""``python -m rewards`` and ``python -m mlx_ft --list-rewards``: listing and scoring a file."""

from __future__ import annotations

import json

from rewards.__main__ import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_list_rewards(capsys):
    assert main(["--list-rewards"]) == 0
    out = capsys.readouterr().out
    assert "math_answer" in out and "code_exec" in out and "soft_overlong_punishment" in out


def test_backend_cli_lists_rewards(capsys):
    from algorithms.cli import run_cli

    assert run_cli("mlx_ft", "unused:Unused", ["--list-rewards"]) == 0
    assert "math_answer" in capsys.readouterr().out


def test_score_file_with_weights_and_columns(tmp_path, capsys):
    data = _write(tmp_path / "c.jsonl", [
        {"prompt": "1+1?", "completion": "The answer is \\boxed{2}", "answer": "2"},
        {"prompt": "2+2?", "completion": "I think 5", "answer": "4"},
        {"prompt": "hi", "completion": "#### 7", "answer": "7"},
    ])
    plugin = tmp_path / "plug.py"
    plugin.write_text("def short(prompts, completions, **kw):\n"
                      "    return [1.0 if len(c) < 10 else 0.0 for c in completions]\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(data), "--reward", "math_answer", "--reward", f"{plugin}:short",
                 "--reward-weights", "1,0.5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # math_answer: 1, 0, 1; short: 0, 1, 1; total = math + 0.5 * short
    assert [r["math_answer"] for r in rows] == [1.0, 0.0, 1.0]
    assert [r["short"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["total"] for r in rows] == [1.0, 0.5, 1.5]
    assert "math_answer" in capsys.readouterr().out


def test_score_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "x"}\n{oops\n')
    assert main(["score", str(bad), "--reward", "json_valid"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    good = _write(tmp_path / "g.jsonl", [{"completion": "x"}])
    assert main(["score", str(good), "--reward", str(tmp_path / "missing.py") + ":f"]) == 2
    assert "missing.py" in capsys.readouterr().err
    assert main(["score", str(good), "--reward", "json_valid", "--reward-weights", "1,2"]) == 2
    assert "--reward-weights" in capsys.readouterr().err


def test_a_reward_that_calls_sys_exit_fails_the_command(tmp_path, capsys):
    """Regression: sys.exit(0) in a reward made `rewards score --out` exit 0 writing nothing."""
    data = _write(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}])
    plugin = tmp_path / "quits.py"
    plugin.write_text("import sys\ndef quits(prompts, completions, **kw):\n    sys.exit(0)\n")
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(data), "--reward", f"{plugin}:quits", "--out", str(out)]) == 2
    assert "'quits' raised SystemExit(0)" in capsys.readouterr().err
    assert not out.exists()


def _big_rows(tmp_path, n=3000):
    return _write(tmp_path / "c.jsonl", [{"completion": f"{{\"k\": {i}}}"} for i in range(n)])


def test_disk_full_while_writing_scores_leaves_nothing(tmp_path, capsys, monkeypatch):
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("converters.atomic.os.fsync", no_space)
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(_big_rows(tmp_path, 5)), "--reward", "json_valid",
                 "--out", str(out)]) == 2
    assert f"{out}: disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_disk_full_on_a_real_tiny_disk(tmp_path, capsys, tiny_tmpfs):
    out = tiny_tmpfs / "scores.jsonl"
    assert main(["score", str(_big_rows(tmp_path)), "--reward", "json_valid",
                 "--out", str(out)]) == 2
    assert f"{out}: disk full" in capsys.readouterr().err
    assert list(tiny_tmpfs.iterdir()) == []


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    good = _write(tmp_path / "g.jsonl", [{"completion": "x"}])
    for flags, message in ((["--timeout", "-1"], "--timeout -1.0: must be a finite"),
                           (["--timeout", "nan"], "--timeout nan: must be a finite"),
                           (["--out", str(tmp_path)], "is a directory")):
        assert main(["score", str(good), "--reward", "json_valid", *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
