"""Models by Hugging Face Hub id: the local cache first, offline; errors name the id and cache."""

from __future__ import annotations

import pytest
from hub_helpers import add_to_hub_cache

from converters import hub
from converters.__main__ import main
from converters.models import resolve_input, resolve_model


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_resolves_to_the_cached_snapshot_offline(hf_home, tiny_llama_dir):
    snapshot = add_to_hub_cache(hf_home, "acme/tiny-llama", tiny_llama_dir)
    assert resolve_model("acme/tiny-llama") == snapshot
    assert hub.hub_cache_dir() == hf_home / "hub"


def test_absent_offline_names_the_id_and_the_cache(hf_home):
    with pytest.raises(hub.HubError) as e:
        resolve_model("acme/absent-model")
    message = str(e.value)
    assert "'acme/absent-model'" in message and str(hf_home / "hub") in message
    assert "offline" in message


def test_incomplete_snapshot_counts_as_absent(hf_home):
    add_to_hub_cache(hf_home, "acme/only-config", {"config.json": "{}"})  # no weights
    with pytest.raises(hub.HubError, match="only-config"):
        resolve_model("acme/only-config")


def test_online_download_is_asked_for_model_files_and_failure_is_reported(hf_home, monkeypatch,
                                                                            tiny_llama_dir):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake_download(repo_id, **kw):
        calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        if repo_id == "acme/down":
            return str(add_to_hub_cache(hf_home, repo_id, tiny_llama_dir))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model("acme/down").is_dir()
    online = [kw for _, kw in calls if not kw.get("local_files_only")]
    assert "*.safetensors" in online[0]["allow_patterns"]
    assert online[0]["cache_dir"] == hf_home / "hub"
    with pytest.raises(hub.HubError, match=r"'acme/unreachable'.*could not be downloaded.*"
                                           "no route to host"):
        resolve_model("acme/unreachable")


def test_local_paths_still_win_and_non_ids_keep_their_errors(hf_home, tiny_llama_dir, tmp_path):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir
    with pytest.raises(ValueError, match="Hub id"):
        resolve_model("not-an-id")
    missing = tmp_path / "nowhere" / "deeper"
    assert resolve_input(str(missing)) == missing  # the converter reports the missing path


def test_converters_take_hub_ids(hf_home, tiny_llama_dir, tmp_path, capsys):
    add_to_hub_cache(hf_home, "acme/tiny-llama", tiny_llama_dir)
    assert main(["info", "acme/tiny-llama"]) == 0
    assert "llama" in capsys.readouterr().out
    out = tmp_path / "mlx"
    assert main(["hf-to-mlx", "acme/tiny-llama", str(out)]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()
    assert main(["hf-to-mlx", "acme/absent", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "acme/absent" in err and "Traceback" not in err
