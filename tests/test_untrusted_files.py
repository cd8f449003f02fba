"""Loading untrusted files: nothing is unpickled, YAML is read with safe_load, no remote code is trusted."""

import ast
import hashlib
import json
import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import arrcoc
from arrcoc.models.canvas_vit import CanvasViTConfig, load_canvas_vit
from arrcoc.models.toy_vit import toy_vit
from arrcoc.relevance import RelevanceConfig
from arrcoc.training import Batch, Trainer, TrainerConfig

PACKAGE = Path(arrcoc.__file__).parent


def malicious_pickle(marker: Path) -> bytes:
    """Unpickling these bytes creates ``marker`` (any code could run instead)."""

    class Exploit:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    return pickle.dumps(Exploit())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_the_pickle_would_run_code_if_it_were_unpickled(tmp_path):
    pickle.loads(malicious_pickle(tmp_path / "marker"))  # the exploit is real ...
    assert (tmp_path / "marker").exists()
    (tmp_path / "evil.pt").write_bytes(malicious_pickle(tmp_path / "marker2"))
    with pytest.raises(pickle.UnpicklingError):  # ... and the safe loader any .pt file must go through refuses it
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert not (tmp_path / "marker2").exists()


def replace_with_pickle(path: Path, marker: Path, meta_file: Path, checksum_key: str) -> None:
    """Put the pickle where a safetensors file is expected and update its checksum, so only the format protects."""
    path.write_bytes(malicious_pickle(marker))
    meta = json.loads(meta_file.read_text())
    meta[checksum_key] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta_file.write_text(json.dumps(meta))


def test_a_pickle_as_checkpoint_weights_is_refused_and_never_runs(tmp_path):
    arrcoc.attach(toy_vit()).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    replace_with_pickle(tmp_path / meta["weights"], tmp_path / "marker", tmp_path / "config.json", "weights_sha256")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        arrcoc.ARRCOC.from_pretrained(tmp_path, toy_vit())
    assert not (tmp_path / "marker").exists()


def test_a_pickle_as_training_state_is_refused_and_never_runs(tmp_path):
    config = TrainerConfig(checkpoint_dir=str(tmp_path), progress=False)
    Trainer(arrcoc.attach(toy_vit()), config).fit([Batch(torch.rand(2, 3, 32, 32))])
    step = next((tmp_path / "training").glob("step-*"))
    replace_with_pickle(step / "trainer_state.safetensors", tmp_path / "marker", step / "trainer_state.json",
                        "tensors_sha256")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        Trainer(arrcoc.attach(toy_vit()), config).fit([Batch(torch.rand(2, 3, 32, 32))], resume=True)
    assert not (tmp_path / "marker").exists()


def test_a_pickle_as_the_canvas_vit_checkpoint_is_refused_and_never_runs(tmp_path):
    weights = tmp_path / "canvas_vit.safetensors"
    weights.write_bytes(malicious_pickle(tmp_path / "marker"))
    (tmp_path / "canvas_vit.json").write_text(json.dumps({"architecture": asdict(CanvasViTConfig())}))
    with pytest.raises(Exception, match="header"):  # safetensors' own error: not a safetensors header
        load_canvas_vit(weights)
    assert not (tmp_path / "marker").exists()


def test_a_yaml_python_tag_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"relevance: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                    f"['{marker}']]\n")
    with pytest.raises(ValueError, match="is not valid YAML: could not determine a constructor"):
        RelevanceConfig.from_yaml(evil)
    assert not marker.exists()


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def name(node: ast.AST) -> str:
    return ast.unparse(node)


@pytest.mark.parametrize("source", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_library_source_never_unpickles_nor_trusts_remote_code(source):
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"pickle", "dill", "marshal", "shelve", "cloudpickle"} & set(modules), ast.unparse(node)
    for call in calls(tree):
        function = name(call.func)
        keywords = {k.arg: k.value for k in call.keywords}
        if function == "torch.load":
            assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True, \
                f"{source}: {ast.unparse(call)} must pass weights_only=True"
        assert function not in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"), f"{source}: {ast.unparse(call)}"
        trust = keywords.get("trust_remote_code")
        assert trust is None or (isinstance(trust, ast.Constant) and trust.value is False), \
            f"{source}: {ast.unparse(call)} sets trust_remote_code"
