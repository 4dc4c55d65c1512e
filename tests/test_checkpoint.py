"""Checkpoint loading: released layouts, safetensors, strictness and clear errors, unsafe pickles refused."""

import json
import os
import pickle
import re
import warnings

import pytest
import torch

import vqfr
from tests.conftest import TINY_V1, TINY_V2, golden, needs_golden, seeded_model
from vqfr.checkpoint import filter_state_dict, guess_arch, save_released


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["params", "params_ema", "both", "module", "plain", "ddp", "module.module"])
def test_released_layouts_load(tmp_path, layout):
    model = seeded_model(TINY_V2)
    sd = model.state_dict()
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    obj = {
        "params": {"params": sd},
        "params_ema": {"params_ema": sd},
        "both": {"params": other, "params_ema": sd},  # params_ema wins
        "module": {"params": {f"module.{k}": v for k, v in sd.items()}},
        "plain": dict(sd),
        "ddp": {f"module.{k}": v for k, v in sd.items()},  # model.state_dict() of a DDP-wrapped model
        "module.module": {"params": {f"module.module.{k}": v for k, v in sd.items()}},  # DataParallel inside DDP
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = vqfr.load_model(path, TINY_V2)
    assert _same_weights(loaded, model)
    assert not loaded.training


def test_filter_is_idempotent():
    sd = seeded_model(TINY_V1).state_dict()
    once = filter_state_dict({"params": {f"module.{k}": v for k, v in sd.items()}})
    assert filter_state_dict(once) == once
    assert once.keys() == sd.keys()


def test_safetensors_round_trip_keeps_options(tmp_path):
    model = seeded_model(TINY_V1)
    path = vqfr.save_safetensors(model, tmp_path / "tiny.safetensors")
    loaded = vqfr.load_model(path)  # options come from the file's metadata
    assert loaded.options == model.options
    assert _same_weights(loaded, model)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    upper = path.rename(tmp_path / "TINY.SafeTensors")  # the backend table takes the suffix in any case; so does this
    assert _same_weights(vqfr.load_model(upper), model)  # was read with torch.load: "not a readable checkpoint"


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    """An export's sidecar records the weights' sha256, and the benchmark's engine cache keys on the weights: the
    same model must save to the same file. safetensors writes its metadata in hash-map order, which varies from
    one save to the next (3 entries: 6 orders), so several saves would differ without the sorting."""
    from safetensors import safe_open

    model = seeded_model(TINY_V2)
    blobs = {vqfr.save_safetensors(model, tmp_path / f"w{i}.safetensors").read_bytes() for i in range(6)}
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0
    header = json.loads(blob[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(tmp_path / "w0.safetensors"), "pt") as f:  # still a file safetensors reads
        assert f.metadata() == header["__metadata__"]
        assert all(torch.equal(f.get_tensor(k), v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change", ["unknown key", "missing nested key", "other architecture"])
def test_safetensors_with_bad_stored_options_names_the_file(tmp_path, change):
    model = seeded_model(TINY_V2)
    if change == "unknown key":
        model.options = {**TINY_V2, "bogus": 1}
    elif change == "missing nested key":
        model.options = {**TINY_V2, "align_opt": {"cond_channels": 32}}
    else:
        model.options = TINY_V1
    path = vqfr.save_safetensors(model, tmp_path / "stored.safetensors")
    with pytest.raises(vqfr.CheckpointError) as err:
        vqfr.load_model(path)  # the options come from the file's metadata
    msg = str(err.value)
    assert str(path) in msg and "metadata" in msg and "Fix:" in msg
    assert _same_weights(vqfr.load_model(path, TINY_V2), model)  # explicit options are the documented fix


def test_released_save_round_trip(tmp_path):
    model = seeded_model(TINY_V2)
    path = save_released(tmp_path / "net.pth", model.state_dict(), model.state_dict())
    assert set(torch.load(path, weights_only=True)) == {"params", "params_ema"}
    assert _same_weights(vqfr.load_model(path, TINY_V2), model)


def test_version_guess_and_wrong_version_error(tmp_path):
    path = tmp_path / "v1.pth"
    torch.save({"params": seeded_model(TINY_V1).state_dict()}, path)
    assert guess_arch(torch.load(path, weights_only=True)["params"]) == "VQFRv1"
    with pytest.raises(vqfr.CheckpointError) as err:
        vqfr.load_model(path, TINY_V2)
    msg = str(err.value)
    assert str(path) in msg and "looks like VQFRv1" in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "options='v1'" in msg


def test_missing_keys_listed(tmp_path):
    sd = seeded_model(TINY_V2).state_dict()
    dropped = "feat2index.1.weight"
    del sd[dropped]
    path = tmp_path / "partial.pth"
    torch.save({"params": sd}, path)
    with pytest.raises(vqfr.CheckpointError, match="1 missing keys: feat2index.1.weight"):
        vqfr.load_model(path, TINY_V2)


def test_official_config_shape_mismatch_names_shapes(tmp_path):
    path = tmp_path / "tiny_v2.pth"
    torch.save({"params": seeded_model(TINY_V2).state_dict()}, path)
    with pytest.raises(vqfr.CheckpointError, match="shape mismatches"):
        vqfr.load_model(path)  # guessed v2, official config: shapes differ


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_code_executing_pickle_is_refused(tmp_path):
    """pickle.dump writes protocol 4 or 5, and torch.load warns of any protocol above its own 2: the refusal must be
    the only thing the user sees (the CLI's one error line), not that warning before it."""
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": _RunsCode()}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(vqfr.CheckpointError, match="refused"):
            vqfr.load_model(path, TINY_V2)
    assert not caught, [str(w.message) for w in caught]


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"params": seeded_model(TINY_V2).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(vqfr.CheckpointError, match="cut.pth"):
        vqfr.load_model(path, TINY_V2)
    with pytest.raises(vqfr.CheckpointError, match="does not exist"):
        vqfr.load_model(tmp_path / "nope.pth")


@needs_golden
def test_golden_checkpoint_loads_from_yml(tmp_path):
    import yaml

    info, ckpt, _ = golden("v2")
    yml = tmp_path / "test_small.yml"
    yml.write_text(yaml.safe_dump({"name": "small", "network_sr": info["network_options"]}))
    model = vqfr.load_model(ckpt, yml)
    assert model.options["base_channels"] == 32
    with pytest.raises(vqfr.CheckpointError, match="looks like VQFRv2"):
        vqfr.load_model(ckpt, "v1")


def test_a_mismatch_is_reported_in_a_few_keys_with_the_options_to_pass(tmp_path):
    """Hundreds of differing keys: the counts and a few examples, not a thousand characters; the fix names how to
    pass the options in each interface."""
    path = save_released(tmp_path / "tiny_v2.pth", seeded_model(TINY_V2).state_dict())
    with pytest.raises(vqfr.CheckpointError) as err:
        vqfr.load_model(path)  # guessed v2, official options: other sizes
    reason, fix = err.value.reason, err.value.fix or ""
    assert len(reason) < 400, reason
    assert re.search(r"\d+ missing keys: [\w.]+, [\w.]+, \.\.\. \(\d+ more\)", reason), reason
    assert re.search(r"\d+ shape mismatches: ", reason), reason
    assert "--config FILE.yml" in fix and "config=" in fix and "options=" in fix, fix


@pytest.mark.parametrize("layout", ["network_options", "bare"])
def test_options_file_may_be_a_json_description_or_bare_options(tmp_path, layout):
    """Besides an official yml (network_sr / network_g), a file whose options sit under network_options (the golden
    models' JSON), or the options mapping itself; JSON is YAML, so .json files load too."""
    doc = {"arch": "VQFRv2", "network_options": TINY_V2, "input_shape": [1, 3, 64, 64]} if layout != "bare" else TINY_V2
    config = tmp_path / "small.json"
    config.write_text(json.dumps(doc))
    model = seeded_model(TINY_V2)
    loaded = vqfr.load_model(save_released(tmp_path / "small.pth", model.state_dict()), config)
    assert loaded.options == TINY_V2 and _same_weights(loaded, model)


def test_an_options_file_without_a_network_block_names_every_accepted_block(tmp_path):
    config = tmp_path / "other.json"
    config.write_text(json.dumps({"arch": "VQFRv2", "input_shape": [1, 3, 64, 64]}))
    with pytest.raises(vqfr.ConfigError, match="other.json: has no network_sr, network_g or network_options block"):
        vqfr.build_model(config)
