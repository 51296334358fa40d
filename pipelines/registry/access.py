"""Who may use the team's MLflow server: MLflow's basic-auth app, and loopline's two roles.

`loopline tracking-server --auth` runs `mlflow server --app-name basic-auth` with a config
written here (`auth_config`): users and their permissions in their own database, every user
allowed to read (`default_permission = READ`), the admin created on the first start from
$MLFLOW_AUTH_ADMIN_PASSWORD (MLflow's own variable; no password is ever written to a file).

Clients authenticate with MLflow's own variables, $MLFLOW_TRACKING_USERNAME and
$MLFLOW_TRACKING_PASSWORD, which every loopline command (and MLflow's UI login) uses.

`loopline users add NAME --role reader|writer` (with the admin's credentials) creates a user:
a reader browses runs and the registry and can change nothing; a writer also gets EDIT on
the params' training and monitoring experiments and MANAGE on its registered model, so that
it trains, registers and promotes. A change refused by the server is one line naming the user and what to ask for
(`refusal`).
"""

from __future__ import annotations

import configparser
from pathlib import Path

from pipelines.core.config import Params
from pipelines.core.errors import LooplineError

ROLES = ("reader", "writer")
AUTH_CACHE_SECONDS = 60  # how long a changed or removed password may still be let in


def auth_config(folder: Path, auth_db: str, admin: str = "admin") -> Path:
    """The basic-auth app's config in `folder` (no secret in it): the users' database, the
    admin's name, READ for every user by default, credentials checked once a minute."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": auth_db,
        "admin_username": admin,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # A password checked once a minute, not per request: each check is a PBKDF2 hash,
        # ~0.3 s here, and a training makes ~60 requests (registration took 21 s, not 1).
        "auth_cache_ttl_seconds": str(AUTH_CACHE_SECONDS),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "basic_auth.ini"
    with path.open("w", encoding="utf-8") as fh:
        config.write(fh)
    return path


def add_user(params: Params, name: str, password: str, role: str) -> str:
    """Create user `name` with `role` on the team's server (tracking.uri), as the admin whose
    credentials are in $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD. For a writer,
    the registered model and the experiments the params name are made first (the server
    refuses any request about one that does not exist yet, even a read), then granted:
    EDIT on the training and monitoring experiments, MANAGE on the model."""
    import warnings

    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():  # importing the client imports MLflow's server, which warns about Starlette
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    from pipelines.registry.tracking import monitoring_experiment, tracking_uri

    uri = tracking_uri(params)
    if role not in ROLES:
        raise LooplineError("users", f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    if not uri.startswith(("http://", "https://")):
        raise LooplineError(
            "users", f"tracking.uri {uri} is not an MLflow server (http://…): users live on a team's server"
        )
    if not password:
        raise LooplineError("users", f"no password for {name!r}: give it on standard input or --password-file")
    auth, registry = AuthServiceClient(uri), MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        auth.create_user(name, password)
        if role == "writer":
            model = params.tracking.model_name
            if not registry.search_registered_models(filter_string=f"name = '{model}'"):
                registry.create_registered_model(model)
            auth.grant_user_permission(name, "registered_model", model, "MANAGE")
            for experiment in (params.tracking.experiment, monitoring_experiment(params)):
                found = registry.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else registry.create_experiment(experiment)
                auth.grant_user_permission(name, "experiment", experiment_id, "EDIT")
    except Exception as err:
        raise refusal(err, "users add", uri) or err from None
    return f"{name}: created as a {role} on {uri}"


def refusal(err: BaseException, action: str, tracking_uri: str = "") -> LooplineError | None:
    """The one line to show for MLflow refusing a request for want of credentials (401) or
    permission (403); None for any other error."""
    code = str(getattr(err, "error_code", ""))
    status = getattr(getattr(err, "response", None), "status_code", None)
    text = str(err)
    where = f" on {tracking_uri}" if tracking_uri else ""
    if code == "UNAUTHENTICATED" or status == 401 or "401" in text.split("\n", 1)[0]:
        return LooplineError(
            action,
            f"the MLflow server{where} wants credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        )
    if code == "PERMISSION_DENIED" or status == 403 or "403" in text.split("\n", 1)[0]:
        import os

        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
        return LooplineError(
            action,
            f"the MLflow server{where} refused it: {user} may not do this (a reader browses and changes nothing; "
            "a writer trains, registers and promotes: `loopline users add NAME --role writer`, as the admin)",
        )
    return None
