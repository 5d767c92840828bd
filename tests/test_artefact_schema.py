"""Hand-edited artefacts: for every documented field of every manifest (profile, predictors, plan, hardware),
deleting it or giving it the wrong JSON type is refused at load with one line naming the field and the fix.
Tiny random-weight models and artefacts made here."""
import copy
import json
import os
import shutil

import numpy as np
import pytest

from hetinfer.config import ModelConfig
from hetinfer.errors import HetinferError
from hetinfer.placement.hardware import ASSUMED_FLASH, FlashTier, GpuTier, Hardware, RamTier, load_hardware
from hetinfer.placement.hardware import hardware_schema
from hetinfer.placement.plan import load_plan, plan_schema
from hetinfer.profiler.artifact import PROFILE_SCHEMA, load_profile
from hetinfer.profiler.collect import ProfileOptions, profile_sequences
from hetinfer.profiler.predictors import PREDICTORS_SCHEMA, TrainOptions, load_predictors
from hetinfer.profiler.train import train_predictors
from hetinfer.schema import MapOf, Nullable, Omittable, dataclass_schema, mismatch
from test_placement_plan import small_plan
from test_profiler import random_sequences, tiny_model

CONFIG = dataclass_schema(ModelConfig)


def fields(schema, value, path=()):
    """(path, spec) of every field `value` holds that `schema` describes, nested ones included."""
    if isinstance(schema, (Omittable, Nullable)):
        yield from fields(schema.spec, value, path)
        return
    if isinstance(schema, dict) and isinstance(value, dict):
        for key, sub in schema.items():
            if key in value:
                yield path + (key,), sub
                yield from fields(CONFIG if path + (key,) == ("model", "config") else sub, value[key], path + (key,))
    elif isinstance(schema, MapOf) and isinstance(value, dict) and value:
        key = next(iter(value))
        yield from fields(schema.spec, value[key], path + (key,))
    elif isinstance(schema, list) and isinstance(value, list) and value:
        yield from fields(schema[0], value[0], path + (0,))


def shown(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def wrong_type(spec):
    return next(v for v in ("text", 12, True, [None], {"x": None}) if mismatch(v, spec, "x") is not None)


def edited(manifest: dict, path, how: str, spec) -> dict:
    m = copy.deepcopy(manifest)
    parent = m
    for p in path[:-1]:
        parent = parent[p]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = wrong_type(CONFIG if path == ("model", "config") else spec)
    return m


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """name -> (directory or file, manifest file name, schema, loader) for one valid artefact of each kind."""
    tmp = tmp_path_factory.mktemp("artefacts")
    m = tiny_model(seed=3, n_layers=1, n_ff=64, vocab=200)
    profile = profile_sequences(m, random_sequences(np.random.default_rng(0), 30, 200, 20, 40),
                                ProfileOptions(samples=400, coact_tokens=100))
    profile.save(str(tmp / "p.profile"))
    preds, _ = train_predictors(m, profile, TrainOptions(ranks=(4,), epochs=1))
    preds.save(str(tmp / "p.predictors"))
    small_plan(tmp)
    hw = Hardware(ram=RamTier(1 << 30, 1e10, 1e-5), gpu=GpuTier(1 << 30, 1e11, 1e10, 1e-5),
                  flash=FlashTier(1 << 40, "/x", method="assumed", **ASSUMED_FLASH), sources={"ram.bytes_per_s": "file"})
    (tmp / "hw.json").write_text(json.dumps(hw.to_dict()))
    return {"profile": (tmp / "p.profile", "manifest.json", PROFILE_SCHEMA, load_profile),
            "predictors": (tmp / "p.predictors", "manifest.json", PREDICTORS_SCHEMA, load_predictors),
            "plan": (tmp / "plan", "plan.json", plan_schema(), load_plan),
            "hardware": (tmp / "hw.json", None, hardware_schema(), load_hardware)}


@pytest.mark.parametrize("kind", ["profile", "predictors", "plan", "hardware"])
def test_every_field_missing_or_mistyped_is_named(kind, artefacts, tmp_path):
    src, name, schema, load = artefacts[kind]
    manifest = json.loads((src / name if name else src).read_text())
    assert mismatch(manifest, schema, "") is None  # what the writer makes passes
    load(str(src))
    checked = 0
    for path, spec in fields(schema, manifest):
        if path in (("format",), ("version",)):  # checked first, with their own messages (tested elsewhere)
            continue
        for how in ("type",) if isinstance(spec, Omittable) else ("delete", "type"):
            dst = tmp_path / f"{kind}-{checked}"
            if name:
                shutil.copytree(src, dst)
                target = dst / name
            else:
                target = dst
            target.write_text(json.dumps(edited(manifest, path, how, spec)))
            with pytest.raises(HetinferError) as e:
                load(str(dst))
            msg = str(e.value)
            want = f"`{shown(path)}` is missing" if how == "delete" else f"`{shown(path)}` must be"
            assert want in msg and "\n" not in msg and str(target) in msg, (path, how, msg)
            assert "re-run" in msg or "docs/formats" in msg, msg
            checked += 1
    assert checked >= {"profile": 50, "predictors": 60, "plan": 90, "hardware": 20}[kind], checked


def test_config_that_is_not_a_model_is_named(artefacts, tmp_path):
    src = artefacts["profile"][0]
    dst = tmp_path / "p"
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["model"]["config"]["n_kv_heads"] = 0
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(HetinferError, match="`model.config` is not a usable model config .*n_kv_heads must be a "
                                            "positive integer.*re-run `hetinfer profile`"):
        load_profile(str(dst))
    assert os.path.isdir(src)
