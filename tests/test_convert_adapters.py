"""mlx-lm <-> PEFT adapter conversion, checked with the real libraries on tiny Llama / Qwen2.

An adapter made by one library (random non-zero B, perturbed DoRA magnitudes), converted, and
loaded by the other gives the same fp32 logits within 1e-4; converted back it is bit-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tiny_model

from converters.__main__ import main
from converters.adapters import (
    LEAVES,
    join_key,
    mlx_adapter_to_peft,
    peft_to_mlx_adapter,
    split_key,
)

IDS = np.random.default_rng(0).integers(0, 384, size=(2, 12))
ATOL = 1e-4


# --- helpers shared with test_convert_fuse ----------------------------------------------------
def make_peft_adapter(base: Path, out: Path, *, dora: bool, targets, layers=None,
                      rslora: bool = False, seed: int = 0) -> Path:
    """PEFT's own adapter (get_peft_model + save_pretrained) with random B and magnitudes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=layers,
                        use_dora=dora, use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(str(out))
    return out


def make_mlx_adapter(base: Path, out: Path, *, dora: bool, keys, num_layers: int,
                     seed: int = 0) -> Path:
    """mlx-lm's own adapter (linear_to_lora_layers, saved as its trainer does), randomised."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    model, _ = load_model(Path(base))
    model.freeze()
    params = {"rank": 4, "scale": 2.5, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, dict(params), use_dora=dora)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        array = np.array(value)
        if name.endswith(".lora_b"):
            array = rng.normal(0.0, 0.05, array.shape)
        elif name.endswith(".m"):
            array = array * (1.0 + rng.normal(0.0, 0.1, array.shape))
        weights[name] = mx.array(array.astype(np.float32))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    config = {"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
              "lora_parameters": params, "model": str(base)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def peft_logits(base: Path, adapter: Path | None = None) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def mlx_logits(base: Path, adapter: Path | None = None) -> np.ndarray:
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(base), adapter_path=None if adapter is None else str(adapter))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def stored_tensors(path: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes), read with the safetensors library itself."""
    import torch
    from safetensors.torch import load_file

    return {k: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy()
                .tobytes()) for k, t in load_file(str(path)).items()}


# --- the key map ------------------------------------------------------------------------------
def test_key_map_is_invertible():
    path = "model.layers.3.mlp.down_proj"
    for leaf in LEAVES:
        mlx_key, peft_key = join_key(path, leaf, "mlx"), join_key(path, leaf, "peft")
        assert split_key(mlx_key, "mlx") == (path, leaf)
        assert split_key(peft_key, "peft") == (path, leaf)
        assert peft_key == f"base_model.model.{path}.{leaf.peft}"
    assert len({leaf.mlx for leaf in LEAVES}) == len({leaf.peft for leaf in LEAVES}) == len(LEAVES)
    assert split_key("model.layers.0.self_attn.q_proj.lora_A.default.weight", "peft") is None


# --- both directions with the real libraries --------------------------------------------------
CASES = [  # family, dora, subset of modules (and only the last block) or every linear layer
    ("llama", False, True), ("llama", True, False), ("qwen2", False, False), ("qwen2", True, True),
]


@pytest.mark.parametrize(("family", "dora", "subset"), CASES)
def test_peft_to_mlx_and_back(tmp_path, tiny_llama_dir, tiny_qwen2_dir, family, dora, subset):
    base = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    targets, layers = (["q_proj", "down_proj"], [1]) if subset else ("all-linear", None)
    original = make_peft_adapter(base, tmp_path / "peft", dora=dora, targets=targets, layers=layers)
    # the last-block subset needs the base's block count; the all-blocks case converts without
    peft_to_mlx_adapter(original, tmp_path / "mlx", base=base if subset else None)
    reference = peft_logits(base, original)
    assert np.abs(reference - peft_logits(base)).max() > 1e-2  # the adapter does something
    np.testing.assert_allclose(mlx_logits(base, tmp_path / "mlx"), reference, atol=ATOL, rtol=0)

    mlx_adapter_to_peft(tmp_path / "mlx", tmp_path / "back")
    assert stored_tensors(tmp_path / "back/adapter_model.safetensors") == stored_tensors(
        original / "adapter_model.safetensors")
    before = json.loads((original / "adapter_config.json").read_text())
    after = json.loads((tmp_path / "back/adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_dora", "use_rslora", "lora_dropout", "layers_to_transform"):
        assert after[key] == before[key], key
    mlx_config = json.loads((tmp_path / "mlx/adapter_config.json").read_text())
    assert mlx_config["num_layers"] == (1 if subset else -1)
    assert mlx_config["lora_parameters"]["scale"] == 8 / 4


@pytest.mark.parametrize(("family", "dora", "subset"), CASES)
def test_mlx_to_peft_and_back(tmp_path, tiny_llama_dir, tiny_qwen2_dir, family, dora, subset):
    base = tiny_llama_dir if family == "llama" else tiny_qwen2_dir
    keys, num_layers = (["self_attn.v_proj", "mlp.up_proj"], 1) if subset else (None, 16)
    original = make_mlx_adapter(base, tmp_path / "mlx", dora=dora, keys=keys,
                                num_layers=num_layers)
    mlx_adapter_to_peft(original, tmp_path / "peft", base=base)
    reference = mlx_logits(base, original)
    assert np.abs(reference - mlx_logits(base)).max() > 1e-2
    np.testing.assert_allclose(peft_logits(base, tmp_path / "peft"), reference, atol=ATOL, rtol=0)
    peft_config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert peft_config["lora_alpha"] == 10 and peft_config["r"] == 4  # scale 2.5 = 10 / 4
    assert peft_config["layers_to_transform"] == ([1] if subset else None)

    peft_to_mlx_adapter(tmp_path / "peft", tmp_path / "back", base=base)
    assert stored_tensors(tmp_path / "back/adapters.safetensors") == stored_tensors(
        original / "adapters.safetensors")
    after = json.loads((tmp_path / "back/adapter_config.json").read_text())
    assert after["fine_tune_type"] == ("dora" if dora else "lora")
    assert after["lora_parameters"]["scale"] == 2.5
    if subset:
        assert after["lora_parameters"]["keys"] == sorted(keys) and after["num_layers"] == 1


def test_rslora_scale_is_alpha_over_sqrt_r(tmp_path, tiny_llama_dir):
    original = make_peft_adapter(tiny_llama_dir, tmp_path / "peft", dora=True,
                                 targets=["k_proj", "o_proj"], rslora=True)
    peft_to_mlx_adapter(original, tmp_path / "mlx")
    config = json.loads((tmp_path / "mlx/adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 8 / 2  # lora_alpha / sqrt(r), r = 4
    np.testing.assert_allclose(mlx_logits(tiny_llama_dir, tmp_path / "mlx"),
                               peft_logits(tiny_llama_dir, original), atol=ATOL, rtol=0)
    mlx_adapter_to_peft(tmp_path / "mlx", tmp_path / "back")
    back = json.loads((tmp_path / "back/adapter_config.json").read_text())
    assert back["use_rslora"] is True and back["lora_alpha"] == 8


def test_bf16_adapter_round_trips_bit_exact(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file, save_file

    original = make_peft_adapter(tiny_llama_dir, tmp_path / "peft", dora=True, targets=["v_proj"])
    file = original / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(file)).items()}, str(file),
              metadata={"format": "pt"})
    peft_to_mlx_adapter(original, tmp_path / "mlx")
    mlx_adapter_to_peft(tmp_path / "mlx", tmp_path / "back")
    assert stored_tensors(tmp_path / "back/adapter_model.safetensors") == stored_tensors(file)
    assert {d for d, _, _ in stored_tensors(tmp_path / "mlx/adapters.safetensors").values()} == {
        "torch.bfloat16"}


def test_our_trainers_adapters_convert(tmp_path, tiny_llama_dir):
    """mlx_ft's save_adapters (DoRA) -> PEFT and cuda_ft's (LoRA) -> mlx-lm give equal logits."""
    from types import SimpleNamespace

    import mlx.core as mx
    import torch

    from cuda_ft.device import DeviceChoice
    from cuda_ft.model import load_model as torch_load
    from mlx_ft import model as mlx_model
    from mlx_ft.backend import MLXBackend

    cfg = SimpleNamespace(fine_tune_type="dora", target_modules=["q_proj", "gate_proj"],
                          lora_rank=4, lora_alpha=16.0, lora_dropout=0.0, seed=3,
                          kernels="torch", grad_checkpoint=False)
    model, _ = mlx_model.load_model(tiny_llama_dir, None)
    adapter_config = mlx_model.attach_adapters(model, cfg)
    rng = np.random.default_rng(1)
    model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)))
                        for k, v in mlx_model.trainable(model).items() if k.endswith("lora_b")],
                       strict=False)
    (tmp_path / "ours_mlx").mkdir()
    MLXBackend.save_adapters(SimpleNamespace(model=model, adapter_config=adapter_config,
                                             model_path=tiny_llama_dir, cfg=cfg,
                                             value_head=None, tokenizer=None,
                                             init_adapter=None),
                             str(tmp_path / "ours_mlx"))
    mlx_adapter_to_peft(tmp_path / "ours_mlx", tmp_path / "as_peft")
    np.testing.assert_allclose(peft_logits(tiny_llama_dir, tmp_path / "as_peft"),
                               mlx_logits(tiny_llama_dir, tmp_path / "ours_mlx"), atol=ATOL, rtol=0)

    cfg = SimpleNamespace(**{**vars(cfg), "fine_tune_type": "lora", "target_modules": []})
    peft_model = torch_load(cfg, tiny_llama_dir, DeviceChoice(torch.device("cpu"),
                                                              torch.float32, "test"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "ours_peft"))
    peft_to_mlx_adapter(tmp_path / "ours_peft", tmp_path / "as_mlx")
    np.testing.assert_allclose(mlx_logits(tiny_llama_dir, tmp_path / "as_mlx"),
                               peft_logits(tiny_llama_dir, tmp_path / "ours_peft"),
                               atol=ATOL, rtol=0)


# --- bad input fails before anything is written -----------------------------------------------
@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("a") / "peft", dora=False,
                             targets=["q_proj", "v_proj"])


def _copy(src: Path, dst: Path, config_update: dict | None = None, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if config_update is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**config, **config_update}))
    if drop:
        (dst / drop).unlink()
    return dst


def _fails(tmp_path, convert, src, match, base=None, error=ValueError):
    with pytest.raises(error, match=match):
        convert(src, tmp_path / "out", base=base)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_adapter_for_another_base_names_key_and_shapes(tmp_path, peft_adapter):
    other = make_tiny_model(tmp_path / "wide", hidden_size=96, heads=4, kv_heads=2)
    _fails(tmp_path, peft_to_mlx_adapter, peft_adapter,
           r"adapter_model.safetensors: base_model\.model\.model\.layers\.0\.self_attn\.q_proj"
           r"\.lora_A\.weight has shape \(4, 64\) but the base's model\.layers\.0\.self_attn"
           r"\.q_proj\.weight in .*model\.safetensors has shape \(96, 96\)", base=other)


def test_unknown_target_module_names_it(tmp_path, peft_adapter, tiny_llama_dir):
    from safetensors.numpy import load_file, save_file

    bad = _copy(peft_adapter, tmp_path / "bad")
    file = bad / "adapter_model.safetensors"
    save_file({k.replace("v_proj", "vv_proj"): v for k, v in load_file(str(file)).items()},
              str(file))
    _fails(tmp_path, peft_to_mlx_adapter, bad, r"has no linear layer model\.layers\.0\.self_attn"
           r"\.vv_proj \(its 2 blocks have: .*self_attn\.v_proj", base=tiny_llama_dir)


def test_missing_config_and_weights(tmp_path, peft_adapter):
    bad = _copy(peft_adapter, tmp_path / "no_config", drop="adapter_config.json")
    _fails(tmp_path, peft_to_mlx_adapter, bad, r"no_config/adapter_config\.json: missing",
           error=FileNotFoundError)
    bad = _copy(peft_adapter, tmp_path / "no_weights", drop="adapter_model.safetensors")
    _fails(tmp_path, peft_to_mlx_adapter, bad, r"adapter_model\.safetensors: missing",
           error=FileNotFoundError)


@pytest.mark.parametrize(("kind", "match"), [("qlora", "unknown fine_tune_type 'qlora'"),
                                             ("full", "'full' is a whole model")])
def test_bad_fine_tune_type(tmp_path, tiny_llama_dir, kind, match):
    src = make_mlx_adapter(tiny_llama_dir, tmp_path / "mlx", dora=False, keys=None, num_layers=2)
    bad = _copy(src, tmp_path / "bad", {"fine_tune_type": kind})
    _fails(tmp_path, mlx_adapter_to_peft, bad, match)


@pytest.mark.parametrize(("update", "match"), [
    ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\] but .* has blocks \[0, 1\]"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=.* not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "one rank and one scale"),
    ({"peft_type": "IA3"}, "only LORA converts"),
])
def test_peft_settings_mlx_lm_cannot_express(tmp_path, peft_adapter, update, match):
    _fails(tmp_path, peft_to_mlx_adapter, _copy(peft_adapter, tmp_path / "bad", update), match)


def test_first_block_only_is_refused_and_last_block_needs_base(tmp_path, tiny_llama_dir):
    first = make_peft_adapter(tiny_llama_dir, tmp_path / "first", dora=False, targets=["q_proj"],
                              layers=[0])
    _fails(tmp_path, peft_to_mlx_adapter, first, "does not end at the last of 2 blocks",
           base=tiny_llama_dir)
    last = make_peft_adapter(tiny_llama_dir, tmp_path / "last", dora=False, targets=["q_proj"],
                             layers=[1])
    _fails(tmp_path, peft_to_mlx_adapter, last, "pass --base MODEL_DIR")


def test_existing_output_needs_force(tmp_path, peft_adapter, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["peft-to-mlx-adapter", str(peft_adapter), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    # --force never deletes what another verb or a person put there (the bug: it replaced any dir)
    assert main(["peft-to-mlx-adapter", str(peft_adapter), str(out), "--force"]) == 2
    assert "not an output of peft-to-mlx-adapter" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()  # an empty dir may be replaced; a previous output too
    for _ in range(2):
        assert main(["peft-to-mlx-adapter", str(peft_adapter), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".posttrain-output.json", "adapter_config.json", "adapters.safetensors"]
    assert main(["mlx-adapter-to-peft", str(out), str(out), "--force"]) == 2
    assert "is an output of peft-to-mlx-adapter" in capsys.readouterr().err


def test_the_value_head_travels_with_the_adapter(tmp_path, tiny_llama_dir, peft_adapter):
    """A PPO run's value_head.safetensors is carried by both conversions and by fuse, byte for
    byte in value; a head for another hidden size is refused naming the file."""
    from algorithms.backend import load_value_head, save_value_head, value_head_init
    from converters.fuse import fuse

    src = _copy(peft_adapter, tmp_path / "src")
    head = value_head_init(7, 64)
    head["v_head.bias"] += 0.25
    save_value_head(src, head)
    as_mlx = peft_to_mlx_adapter(src, tmp_path / "mlx", base=tiny_llama_dir)
    back = mlx_adapter_to_peft(as_mlx, tmp_path / "peft", base=tiny_llama_dir)
    fused = fuse(tiny_llama_dir, back, tmp_path / "fused", fmt="hf")
    for directory in (as_mlx, back, fused):
        got = load_value_head(directory)
        for key, value in head.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{directory}: {key}")
    save_value_head(src, value_head_init(7, 65))
    _fails(tmp_path, peft_to_mlx_adapter, src, "value_head.safetensors.*hidden size 65",
           base=tiny_llama_dir)
    (src / "value_head.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="value_head|header|safetensors"):
        peft_to_mlx_adapter(src, tmp_path / "out2")
