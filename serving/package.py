"""`loopline package`: the registry's champion as a Bento, ready to serve or containerize.

The champion's fitted pipeline is copied (through loopline's skops allowlist) into the
BentoML model store with its metadata and the params it is served with, and the Bento is
built from serving/bentofile.yaml with that model's tag as the Bento argument `model`, so
the Bento serves exactly this model without reaching the registry.

Tags name what they hold: `<model>:v<registry version>-<digest>`, the digest covering the
registry run, the code the Bento includes and the serving params. Packaging an unchanged
champion again reuses its Bento; the BentoML store (`$BENTOML_HOME`, default `~/bentoml`) may
be shared by several clones without one serving another's model.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipelines.core.config import Params, shown
from pipelines.core.errors import LooplineError

REPO = Path(__file__).resolve().parents[1]
BENTOFILE = REPO / "serving" / "bentofile.yaml"
INCLUDED = ("pipelines/*.py", "serving/*.py", "serving/bentofile.yaml")


def bento_model_name(model_name: str) -> str:
    """A BentoML name (lowercase letters, digits, '-', '_', '.') for a registry name."""
    return re.sub(r"[^a-z0-9._-]+", "-", model_name.lower()).strip("-._") or "model"


def package_version(registry_version: str, run_id: str, params: Params) -> str:
    """v<registry version>-<digest of the run, the included code and the serving params>."""
    digest = hashlib.sha256(f"{run_id}\n".encode())
    for pattern in INCLUDED:
        for path in sorted(REPO.glob(pattern)):
            digest.update(f"{path.relative_to(REPO)}\n".encode() + path.read_bytes())
    digest.update(json.dumps(shown(params), sort_keys=True).encode())
    return f"v{registry_version}-{digest.hexdigest()[:10]}"


def build_bento(params: Params) -> tuple[str, str, str, bool]:
    """Returns (Bento tag, BentoML model tag, registry version, whether it was built now)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from pipelines.core.names import CHAMPION
    from pipelines.model.io import save_model
    from pipelines.model.onnx_engine import ONNX_FILE, PARITY_FILE
    from pipelines.registry.champion import alias_version
    from pipelines.registry.tracking import load_model_files, registry_client

    client = registry_client(params)
    name = params.tracking.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        raise LooplineError("package", f"model {name!r} has no champion to package; run `loopline train` first")
    run_id = client.get_model_version(name, version).run_id
    tag = f"{bento_model_name(name)}:{package_version(version, run_id, params)}"
    try:
        bentoml.bentos.get(tag)
        return tag, tag, version, False  # the same model, code and params: built before
    except NotFound:
        pass
    model, meta, files = load_model_files(client, name, version, (ONNX_FILE, PARITY_FILE))
    meta = {**meta, "model_name": name, "model_version": version, "run_id": run_id}
    try:
        stored = bentoml.models.get(tag)
    except NotFound:
        with bentoml.models.create(
            tag,
            labels={"registry_version": version},
            metadata={"model_name": name, "model_version": version, "run_id": run_id},
        ) as stored:
            save_model(model, meta, stored.path)
            for file, data in files.items():  # the ONNX form: a packaged model starts without converting
                Path(stored.path_of(file)).write_bytes(data)
            Path(stored.path_of("params.json")).write_text(json.dumps(shown(params), indent=2), encoding="utf-8")
    bento = bentoml.bentos.build_bentofile(
        str(BENTOFILE),
        name=bento_model_name(name),
        version=tag.split(":")[1],
        build_ctx=str(REPO),
        args={"model": str(stored.tag)},
    )
    return str(bento.tag), str(stored.tag), version, True
