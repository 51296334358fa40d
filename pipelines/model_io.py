"""Save and load the fitted model pipeline with skops, trusting only the types it needs.

skops refuses to instantiate types that are not trusted. We never trust everything: the
allowlist below names exactly what loopline's pipelines contain, and a file that asks for
anything else is refused with the offending types named (a tampered or foreign file).
skops names objects by their memory address and stamps the zip with the time; we renumber
the addresses in order of appearance and fix the timestamps, so the same model always gives
the same bytes, which keeps `dvc repro` outputs and their hashes reproducible.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

from pipelines.errors import LooplineError
from pipelines.storage import read_json, write_bytes, write_json

MODEL_FILE = "model.skops"
META_FILE = "model.json"

TRUSTED_TYPES = frozenset({
    "numpy.dtype",
    "pipelines.features.CyclicalEncoder",
    "pipelines.torch_model.TorchMLPClassifier",
    "pipelines.torch_model.TorchMLPRegressor",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn.tree._tree.Tree",
})


_ID = re.compile(r'(?<="__id__": )\d+|\b\d+(?=\.npy\b)')


def _canonical_zip(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        schema = src.read("schema.json").decode("utf-8")
        number: dict[str, str] = {}
        for match in _ID.finditer(schema):
            number.setdefault(match.group(), str(len(number) + 1))
        renamed = _ID.sub(lambda m: number[m.group()], schema)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                stem, dot, ext = info.filename.partition(".")
                name = number.get(stem, stem) + dot + ext
                fixed = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type = info.compress_type
                fixed.external_attr = info.external_attr
                body = renamed.encode("utf-8") if info.filename == "schema.json" else src.read(info.filename)
                dst.writestr(fixed, body)
    return out.getvalue()


def dumps_model(model: Any) -> bytes:
    import skops.io as sio

    return _canonical_zip(sio.dumps(model))


def loads_model(data: bytes, source: str = "model") -> Any:
    import skops.io as sio

    try:
        needed = set(sio.get_untrusted_types(data=data))
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise LooplineError("model", f"{source} is not a skops model file: {err}") from None
    refused = sorted(needed - TRUSTED_TYPES)
    if refused:
        raise LooplineError("model", f"{source} asks to load types outside loopline's allowlist "
                                     f"{refused}; refusing to load it")
    return sio.loads(data, trusted=sorted(needed))


def save_model(model: Any, meta: dict[str, Any], model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    write_bytes(dumps_model(model), model_dir / MODEL_FILE)
    write_json(meta, model_dir / META_FILE)


def load_model(model_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise LooplineError("model", f"{path} does not exist; run the train stage first")
    return loads_model(path.read_bytes(), str(path)), read_json(model_dir / META_FILE)
