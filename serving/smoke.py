"""Package the champion, serve the Bento over HTTP, print one prediction, stop it.

python -m serving.smoke [--params params.yaml]      (the end of `make run`)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines.core.config import load_params
from pipelines.core.layout import Layout
from pipelines.core.processes import post
from pipelines.data.split import read_split
from serving.local import local_service
from serving.schema import request_records


def main() -> None:
    from pipelines.core.errors import LooplineError

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")  # `make run` sets nothing for us

    try:
        smoke()
    except (LooplineError, RuntimeError, TimeoutError) as err:  # a server that did not start says why
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def smoke() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    from serving.package import build_bento

    params = load_params(args.params)
    tag, _, version, built = build_bento(params)
    print(
        f"packaged {params.tracking.model_name} v{version} as Bento {tag}" + ("" if built else " (unchanged: reused)")
    )
    with local_service(args.params, ["--bento", tag]) as url:
        record = request_records(read_split(params, "test", "smoke").head(1), params)[0]
        answer = post(f"{url}/predict", record)
    print(f"POST {url}/predict {json.dumps(record)}")
    print(f"-> {json.dumps(answer)}")
    print(f"prediction log: {Layout.of(params).prediction_log}")


if __name__ == "__main__":
    main()
