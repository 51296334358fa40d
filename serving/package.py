"""`loopline package`: the registry's champion as a Bento, ready to serve or containerize.

The champion's fitted pipeline is copied (through loopline's skops allowlist) into the
BentoML model store with its metadata and the params it is served with, and the Bento is
built from serving/bentofile.yaml with that model's tag as the Bento argument `model`, so
the Bento serves exactly this model without reaching the registry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.config import Params
from pipelines.errors import LooplineError

REPO = Path(__file__).resolve().parents[1]
BENTOFILE = REPO / "serving" / "bentofile.yaml"


def bento_model_name(model_name: str) -> str:
    """A BentoML model name (lowercase letters, digits, '-', '_', '.') for a registry name."""
    return re.sub(r"[^a-z0-9._-]+", "-", model_name.lower()).strip("-._") or "model"


def build_bento(params: Params) -> tuple[str, str, str]:
    """Returns (bento tag, BentoML model tag, registry version)."""
    import bentoml

    from pipelines.model_io import save_model
    from pipelines.registry import CHAMPION, alias_version
    from pipelines.tracking import load_model_version, registry_client

    client = registry_client(params)
    name = params.tracking.model_name
    version = alias_version(client, name, CHAMPION)
    if version is None:
        raise LooplineError("package", f"model {name!r} has no champion to package; run `loopline train` first")
    model, meta = load_model_version(client, name, version)
    run_id = client.get_model_version(name, version).run_id
    meta = {**meta, "model_name": name, "model_version": version, "run_id": run_id}
    with bentoml.models.create(bento_model_name(name), labels={"registry_version": version},
                               metadata={"model_name": name, "model_version": version, "run_id": run_id}) as stored:
        save_model(model, meta, stored.path)
        Path(stored.path_of("params.json")).write_text(
            json.dumps(params.model_dump(mode="json", by_alias=True), indent=2), encoding="utf-8")
    bento = bentoml.bentos.build_bentofile(str(BENTOFILE), build_ctx=str(REPO), args={"model": str(stored.tag)})
    return str(bento.tag), str(stored.tag), version
