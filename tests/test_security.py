"""No unpickling, no code from strings, no shell (issue 20, item 5).

pagkit reads weights and tensors only with safetensors, images only with PIL, Fashion-MNIST only from its idx
files. The scan reads src/ with ``ast`` (so ``module.eval()`` is not mistaken for the builtin ``eval``).
"""
import ast
import pickle
import shutil
from pathlib import Path

import pytest
from diffusers import DDIMScheduler, DDPMPipeline

import models

SRC = Path(__file__).parents[1] / "src" / "pagkit"
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}
FORBIDDEN_CALLS = {  # dotted name → why
    "torch.load": "unpickles", "torch.serialization.load": "unpickles", "torch.jit.load": "loads code",
    "torch.hub.load": "downloads and runs code", "torch.hub.load_state_dict_from_url": "downloads and unpickles",
    "numpy.load": "unpickles with allow_pickle", "np.load": "unpickles with allow_pickle",
    "eval": "runs a string as code", "exec": "runs a string as code", "compile": "compiles a string to code",
    "__import__": "imports by a string", "os.system": "runs a shell", "os.popen": "runs a shell",
    "subprocess.run": "runs a process", "subprocess.Popen": "runs a process", "subprocess.call": "runs a process",
    "subprocess.check_call": "runs a process", "subprocess.check_output": "runs a process",
}


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(SRC.parent) if path.is_relative_to(SRC.parent) else path.name
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] in UNPICKLING_MODULES | {"subprocess"}]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLING_MODULES | {"subprocess"}:
                out.append(f"{where}:{node.lineno}: from {node.module} import ...")
            if node.module in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                out.append(f"{where}:{node.lineno}: from {node.module} import load (unpickles)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in FORBIDDEN_CALLS:
                out.append(f"{where}:{node.lineno}: {name}(...) {FORBIDDEN_CALLS[name]}")
            if name and name.endswith("from_pretrained"):  # diffusers reads pickled .bin unless told not to
                safe = {k.arg: k.value for k in node.keywords}
                if not (isinstance(safe.get("use_safetensors"), ast.Constant) and safe["use_safetensors"].value):
                    out.append(f"{where}:{node.lineno}: {name}(...) without use_safetensors=True may unpickle")
            if name and name.split(".")[-1] == "load_state_dict" and node.args and \
                    isinstance(node.args[0], ast.Call) and _dotted(node.args[0].func) in FORBIDDEN_CALLS:
                out.append(f"{where}:{node.lineno}: load_state_dict from an unpickled file")
    return out


def test_the_source_never_unpickles_runs_strings_or_shells():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20  # the scan sees the package
    findings = [f for path in files for f in _findings(path)]
    assert findings == [], "\n".join(findings)


def test_the_scan_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch\nfrom diffusers import UNet2DModel\n"
                   "x = torch.load('w.pt')\ny = eval('1')\nm = UNet2DModel.from_pretrained('f')\nm.eval()\n")
    found = _findings(bad)
    assert [f.split(": ", 1)[1] for f in found] == [
        "import pickle", "torch.load(...) unpickles", "eval(...) runs a string as code",
        "UNet2DModel.from_pretrained(...) without use_safetensors=True may unpickle"]


class _Payload:  # unpickling this creates a file: the proof that something unpickled it
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("layout", ["folder-of-bin", "bin-beside-safetensors", "ckpt-file"])
def test_a_malicious_pickle_is_never_opened(tmp_path, layout):
    from pagkit.load import load_model
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Payload(str(marker)))
    DDPMPipeline(unet=models.unet2d(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    unet = tmp_path / "pipe" / "unet"
    if layout == "folder-of-bin":
        (unet / "diffusion_pytorch_model.safetensors").unlink()
        (unet / "diffusion_pytorch_model.bin").write_bytes(payload)
        with pytest.raises(ValueError, match="holds only pickled weights .*pagkit never unpickles"):
            load_model(tmp_path / "pipe")
    elif layout == "bin-beside-safetensors":  # the safetensors are read, the pickle ignored
        (unet / "diffusion_pytorch_model.bin").write_bytes(payload)
        load_model(tmp_path / "pipe")
    else:
        (tmp_path / "model.ckpt").write_bytes(payload)
        with pytest.raises(ValueError, match="is a pickled .ckpt file; pagkit never unpickles"):
            load_model(tmp_path / "model.ckpt")
    assert not marker.exists()
    shutil.rmtree(tmp_path / "pipe")
