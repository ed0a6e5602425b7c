"""The deployment files agree with each other, with the code and with docs/deploy.md — checked without a Docker daemon.

* ``docker-compose.yml`` and ``docker-compose.gpu.yml`` parse, validate against the Compose Specification's JSON schema
  and have the services, health checks and start order the deployment needs;
* every variable Compose passes to the backend, the trainer and ``datastore-upgrade`` is read by the code (found by
  parsing ``backend/`` and ``ssp_sam/``) or by a library (docs/backend.md, "Read by the libraries"), and documented in
  docs/backend.md; Compose's defaults are the code's;
* ``.env.example`` lists every variable Compose and the code read, and only those, with the defaults that apply;
* what the ``Dockerfile`` copies exists and is not in ``.dockerignore``; torch comes at requirements.txt's pins;
* the commands of docs/deploy.md use the ``Dockerfile``'s build arguments, targets, volumes and port, the Compose
  files' services and volumes, and ``ssp-sam`` commands that parse;
* ``docker compose config`` accepts the files where the Compose plugin is installed.

``tests/fixtures/compose-spec.json`` is ``schema/compose-spec.json`` of github.com/compose-spec/compose-spec
(Apache-2.0), commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = "docker-compose.yml"
COMPOSE_GPU = "docker-compose.gpu.yml"
CODE_PACKAGES = ("backend", "ssp_sam")
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")

# Backend settings Compose sets to something else than the code's default, on purpose (each commented in the file).
COMPOSE_FIXES = {"HOST", "PORT", "MODEL_DIR", "DATASTORE_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
                 "PRELOAD_MODEL", "HF_HOME"}
MODEL_SERVICES = ("datastore-upgrade", "backend", "trainer")


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# what the code reads
# ---------------------------------------------------------------------------------------------------------------------

def _is_os_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
            and node.value.id == "os")


def env_names_read(source: str) -> set[str]:
    """Environment variable names a module reads: ``os.environ.get("X")``, ``os.getenv("X")``, ``os.environ["X"]``,
    and helpers called with the environment mapping ``env`` first (``_get(env, "X", "Y")``, ``_int(env, "X", 1)``,
    ``env.get("X")``), as backend/config.py reads them. (A WSGI ``environ`` is no process environment.)"""
    found: set[str] = set()

    def strings(args) -> None:
        found.update(a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                     and ENV_NAME.match(a.value))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") and (
                    _is_os_environ(func.value) or (isinstance(func.value, ast.Name) and func.value.id == "env")):
                strings(node.args[:1])
            elif (isinstance(func, ast.Attribute) and func.attr == "getenv" and isinstance(func.value, ast.Name)
                  and func.value.id == "os"):
                strings(node.args[:1])
            elif node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == "env":
                strings(node.args[1:])
        elif isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            strings([node.slice])
    return found


@functools.lru_cache(maxsize=None)
def code_env_names() -> frozenset:
    names: set[str] = set()
    for package in CODE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            names |= env_names_read(path.read_text(encoding="utf-8"))
    return frozenset(names)


def _doc_table_names(text: str) -> set[str]:
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`", text, flags=re.M))


@functools.lru_cache(maxsize=None)
def documented_names() -> frozenset:
    """Every variable with a row in a table of docs/backend.md."""
    return frozenset(_doc_table_names(_text("docs/backend.md")))


@functools.lru_cache(maxsize=None)
def library_env_names() -> frozenset:
    """The variables docs/backend.md lists under "Read by the libraries" (huggingface_hub, label-studio-sdk)."""
    text = _text("docs/backend.md")
    section = re.search(r"^### Read by the libraries\n(.*?)(?=^#)", text, flags=re.M | re.S)
    assert section, "docs/backend.md has no '### Read by the libraries' section"
    return frozenset(_doc_table_names(section.group(1)))


def read_somewhere() -> set[str]:
    return set(code_env_names()) | set(library_env_names())


# ---------------------------------------------------------------------------------------------------------------------
# the ssp-sam command line
# ---------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cli_parser():
    from backend.cli import build_parser
    return build_parser()


def cli_commands() -> set[str]:
    parser = cli_parser()
    return {name for action in parser._subparsers._group_actions for name in action.choices}


def parse_ssp_sam(argv: list[str]):
    """Parse ``ssp-sam ARGS`` (argv without the program) as the command would; returns (namespace, error)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return cli_parser().parse_args(argv), None
    except SystemExit as exc:
        return None, (err.getvalue().strip().splitlines() or [f"exit {exc.code}"])[-1]


def check_missing(missing: set[str], what: str) -> None:
    assert not missing, f"{what}: {sorted(missing)}"


def check_ssp_sam_commands(commands: list[list[str]], where: str, missing: set[str] = frozenset()) -> None:
    """Every ``ssp-sam ...`` command (argv after ``ssp-sam``) parses, and nothing is ``missing``."""
    bad = []
    for argv in commands:
        ns, error = parse_ssp_sam(argv)
        if ns is None:
            bad.append(f"ssp-sam {' '.join(argv)}: {error}")
    assert not bad, f"{where}: commands that do not parse: {bad}"
    check_missing(set(missing), f"{where}: variables the code does not read")


# ---------------------------------------------------------------------------------------------------------------------
# Compose interpolation (the Compose Specification's rules: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e},
# ${VAR?e}, ${VAR:+r}, ${VAR+r}, nested in d / e / r)
# ---------------------------------------------------------------------------------------------------------------------

class MissingVariable(ValueError):
    pass


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _closing_brace(text: str, start: int) -> int:
    depth, i = 1, start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, env: dict, names: set | None = None, collect: bool = False) -> str:
    """``text`` with Compose's interpolation applied from ``env``; every name met is added to ``names``.
    ``collect``: visit every branch (to list names) and never raise."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2:end], env, names, collect))
            i = end + 1
        elif m := _NAME.match(text, i + 1):
            if names is not None:
                names.add(m.group())
            out.append(env.get(m.group()) or "")
            i = m.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _expand(body: str, env: dict, names: set | None, collect: bool) -> str:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, flags=re.S)
    if not m:
        raise ValueError(f"bad interpolation ${{{body}}}")
    name, op, arg = m.groups()
    if names is not None:
        names.add(name)
    value = env.get(name)
    if op is None:
        return value or ""
    is_set = value is not None and (value != "" or not op.startswith(":"))
    if collect:
        interpolate(arg, env, names, collect)
    if op.endswith("-"):
        return value if is_set else interpolate(arg, env, names, collect)
    if op.endswith("+"):
        return interpolate(arg, env, names, collect) if is_set else ""
    if not is_set and not collect:
        raise MissingVariable(f"{name}: {interpolate(arg, env, names, collect)}")
    return value or ""


def interpolate_tree(tree, env: dict, names: set | None = None, collect: bool = False):
    if isinstance(tree, str):
        return interpolate(tree, env, names, collect)
    if isinstance(tree, dict):
        return {k: interpolate_tree(v, env, names, collect) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolate_tree(v, env, names, collect) for v in tree]
    return tree


def raw_compose(name: str = COMPOSE) -> dict:
    return yaml.safe_load(_text(name))


def compose_variables(name: str = COMPOSE) -> set[str]:
    names: set[str] = set()
    interpolate_tree(raw_compose(name), {}, names, collect=True)
    return names


def required_variables(name: str = COMPOSE) -> set[str]:
    """Variables Compose refuses to run without (``${VAR:?...}``)."""
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", _text(name)))


def base_env(**more: str) -> dict:
    """Nothing set but the required secrets (with dummy values)."""
    env = {name: f"dummy-{name.lower()}" for name in required_variables(COMPOSE) | required_variables(COMPOSE_GPU)}
    env.update(more)
    return env


def compose(env: dict | None = None, name: str = COMPOSE) -> dict:
    return interpolate_tree(raw_compose(name), base_env() if env is None else env)


def merge(base, override):
    """Compose's merge of an override file, for mappings (what these files use)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def gpu_compose(env: dict | None = None) -> dict:
    return merge(compose(env), compose(env, COMPOSE_GPU))


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def as_argv(command) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


# ---------------------------------------------------------------------------------------------------------------------
# .env.example
# ---------------------------------------------------------------------------------------------------------------------

ENTRY = re.compile(r"^(#\s?)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> list[dict]:
    """Its variables: name, value, active (not commented out), explanation (the comment line above)."""
    lines = _text(".env.example").splitlines()
    entries = []
    for n, line in enumerate(lines):
        m = ENTRY.match(line)
        if m:
            above = lines[n - 1] if n else ""
            explained = above.startswith("#") and not ENTRY.match(above) and len(above.strip("#- ")) > 10
            entries.append({"name": m.group(2), "value": m.group(3), "active": m.group(1) is None,
                            "explained": explained, "line": n + 1})
    return entries


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------------------------

def dockerfile_instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    text = _text("Dockerfile") if text is None else text
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not current):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        instr, _, args = current.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        current = ""
    return out


def dockerfile(kind: str) -> list[str]:
    return [args for instr, args in dockerfile_instructions() if instr == kind]


def dockerfile_args() -> dict:
    args = {}
    for a in dockerfile("ARG"):
        name, _, default = a.partition("=")
        args.setdefault(name, default if _ else None)
    return args


def dockerfile_stages() -> dict:
    """Stage name -> base of each FROM."""
    stages = {}
    for a in dockerfile("FROM"):
        parts = a.split()
        if len(parts) >= 3 and parts[-2].upper() == "AS":
            stages[parts[-1]] = parts[0]
    return stages


def dockerfile_env() -> dict:
    env = {}
    for a in dockerfile("ENV"):
        for item in shlex.split(a):
            k, _, v = item.partition("=")
            env[k] = v
    return env


def target_values() -> set[str]:
    """The values TARGET can take: the suffixes of the stages named like the final FROM's base, torch-${TARGET}."""
    final_base = dockerfile("FROM")[-1].split()[0]
    prefix, _, rest = final_base.partition("${TARGET}")
    assert _ and not rest, f"the last stage should start FROM <prefix>${{TARGET}}, not {final_base}"
    return {name[len(prefix):] for name in dockerfile_stages() if name.startswith(prefix)}


def dockerignore_patterns() -> list[str]:
    return [line.strip() for line in _text(".dockerignore").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes ``path`` (a path relative to the context), or a folder above it."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = re.escape(pattern.lstrip("!").strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(rx, p) for p in prefixes):
            result = not negate
    return result


def comment_commands(name: str) -> list[list[str]]:
    """The example commands in a file's comments: lines ``#   docker ...``."""
    out = []
    for line in _text(name).splitlines():
        m = re.match(r"^#\s{2,}(docker\s.*)$", line)
        if m:
            out.append(shlex.split(m.group(1), comments=True))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# docs/deploy.md
# ---------------------------------------------------------------------------------------------------------------------

def doc_commands() -> list[list[str]]:
    """The commands in the page's shell code blocks (continuations joined, comments and variable assignments left
    out), as argv lists."""
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", _text("docs/deploy.md"), flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                argv.pop(0)
            if argv:
                out.append(argv)
    return out


def options(argv: list[str], *flags: str) -> list[str]:
    """Values of an option in argv (``--flag value`` and ``--flag=value``)."""
    values = []
    for i, a in enumerate(argv):
        for flag in flags:
            if a == flag and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif a.startswith(flag + "="):
                values.append(a[len(flag) + 1:])
    return values


DOCKER_RUN_OPTIONS_WITH_VALUE = {"--name", "-p", "--publish", "-v", "--volume", "-e", "--env", "--gpus", "--network",
                                 "--env-file", "-u", "--user", "--entrypoint", "-w", "--workdir"}


def _split_after_options(argv: list[str], with_value: set[str]) -> tuple[list[str], str, list[str]]:
    """``docker <verb> [compose] OPTIONS WORD REST`` (options from argv[2]) -> (options, word, rest)."""
    i = 2
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in with_value else 1
    return argv[2:i], argv[i], argv[i + 1:]


def split_docker_run(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """``docker run OPTIONS IMAGE COMMAND`` -> (options, image, command)."""
    return _split_after_options(argv, DOCKER_RUN_OPTIONS_WITH_VALUE)


COMPOSE_OPTIONS_WITH_VALUE = {"-f", "--file", "-p", "--project-name", "--env-file", "--profile", "--scale", "-u",
                              "--user", "-e", "--name", "-w", "--workdir", "--entrypoint"}


def split_compose(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """``docker compose GLOBAL SUBCOMMAND ARGS`` -> (global options, subcommand, args)."""
    return _split_after_options(argv, COMPOSE_OPTIONS_WITH_VALUE)


def compose_service_and_command(args: list[str]) -> tuple[str | None, list[str]]:
    """For run/exec: the service and the command after it."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] in COMPOSE_OPTIONS_WITH_VALUE else 1
    return (args[i], args[i + 1:]) if i < len(args) else (None, [])


def tag_ok(tag: str) -> bool:
    """A tag of the repository Compose builds its images into (docs may add their own tags, e.g. cpu-336)."""
    built = {compose()["services"]["backend"]["image"], gpu_compose()["services"]["backend"]["image"]}
    return tag.split(":")[0] in {t.split(":")[0] for t in built}


# =====================================================================================================================
# the checks
# =====================================================================================================================

def test_helpers_see_what_they_should():
    names = code_env_names()
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "DATASTORE_URL", "MODEL_DIR", "GUNICORN_BIND"} <= names
    assert not {"PATH_INFO", "CONTENT_LENGTH"} & names                 # the WSGI environ is not the process's
    assert {"HF_HOME", "HF_TOKEN", "HF_ENDPOINT", "VERIFY_SSL"} <= library_env_names()
    env = {"A": "a", "E": ""}
    assert interpolate("${A:-x}-${B:-y}-${E:-z}-${E-z}-$$A-$A", env) == "a-y-z--$A-a"
    assert interpolate("${B:-${A:+set}}/${E:+no}/${A+yes}", env) == "set//yes"
    with pytest.raises(MissingVariable, match="needed"):
        interpolate("${E:?needed}", env)
    seen: set = set()
    interpolate("${X:-${Y:+$Z}} $${NOT_A_VARIABLE}", {}, seen, collect=True)
    assert seen == {"X", "Y", "Z"}
    assert ignored("ssp_sam/x.py", ["**/__pycache__"]) is False and ignored("a/__pycache__/b.pyc", ["**/__pycache__"])
    assert ignored("tests/test_x.py", ["tests"]) and not ignored("README.md", ["tests"])
    assert "serve" in cli_commands() and parse_ssp_sam(["serve", "--bogus"])[0] is None


# ------------------------------------------------------------------------------------------------------ compose

@pytest.mark.parametrize("name", [COMPOSE, COMPOSE_GPU])
def test_compose_files_validate_against_the_compose_spec(name):
    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    with_example = base_env(**{e["name"]: e["value"] for e in env_example() if e["value"]})
    for doc in (raw_compose(name), compose(name=name), compose(with_example, name)):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
    errors = [e.message for e in validator.iter_errors(gpu_compose())]
    assert not errors, errors


def test_compose_has_the_services_health_checks_and_start_order():
    services = compose()["services"]
    assert {"label-studio", "postgres", "datastore-upgrade", "backend", "trainer"} <= set(services)
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    assert services["postgres"]["image"].startswith("postgres:")
    for name in ("label-studio", "postgres", "backend"):
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} needs a health check"
    for name in ("datastore-upgrade", "trainer"):      # the image's check is the backend's /health: not for these
        assert services[name]["healthcheck"] == {"disable": True}, name
    assert "pg_isready" in " ".join(as_argv(services["postgres"]["healthcheck"]["test"]))
    assert "/health" in " ".join(as_argv(services["label-studio"]["healthcheck"]["test"]))
    backend_check = " ".join(as_argv(services["backend"]["healthcheck"]["test"]))
    url = re.search(r"http://[^ ]+", backend_check).group()
    from backend.serving.app import ROUTES
    assert urlsplit(url).path in {route for route, _, _ in ROUTES}
    assert urlsplit(url).port == int(environment(services["backend"])["PORT"])

    assert services["datastore-upgrade"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["datastore-upgrade"]["restart"] == "no"
    for name in ("backend", "trainer"):
        assert services[name]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "datastore-upgrade": {"condition": "service_completed_successfully"}}
    assert as_argv(services["datastore-upgrade"]["command"]) == ["ssp-sam", "datastore", "upgrade"]
    assert as_argv(services["backend"]["command"]) == ["ssp-sam", "serve"]
    assert as_argv(services["trainer"]["command"])[:3] == ["ssp-sam", "finetune", "--watch"]
    check_ssp_sam_commands([as_argv(services[s]["command"])[1:] for s in MODEL_SERVICES], COMPOSE)


def test_compose_volumes_are_declared_and_mounted_where_the_image_expects_them():
    doc = compose()
    declared = set(doc["volumes"])
    assert {"ls-data", "pg-data", "model-data", "weights"} <= declared
    image_volumes = set(json.loads(dockerfile("VOLUME")[-1]))
    for name, service in doc["services"].items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            assert source in declared, f"{name}: {mount} uses an undeclared volume"
            if name in MODEL_SERVICES:
                assert target in image_volumes, f"{name}: {target} is not a VOLUME of the Dockerfile"
    mounts = {s: set(doc["services"][s]["volumes"]) for s in MODEL_SERVICES}
    assert mounts["backend"] == mounts["trainer"] == {"model-data:/data", "weights:/weights"}
    assert "model-data:/data" in mounts["datastore-upgrade"]


def test_label_studio_is_set_up_for_a_backend_on_the_private_network():
    services = compose()["services"]
    ls, backend = environment(services["label-studio"]), environment(services["backend"])
    assert ls["ML_BLOCK_LOCAL_IP"] == "false" and ls["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert ls["LABEL_STUDIO_USER_TOKEN"] == backend["LABEL_STUDIO_API_KEY"]        # the token the backend sends
    assert ls["LABEL_STUDIO_HOST"].startswith("http") and ls["LABEL_STUDIO_USERNAME"] and ls["LABEL_STUDIO_PASSWORD"]
    # the backend reaches Label Studio by its service name, on the port Label Studio listens on in its container
    url = urlsplit(backend["LABEL_STUDIO_URL"])
    assert url.hostname == "label-studio" and url.hostname in services
    assert any(str(p).endswith(f":{url.port}") for p in services["label-studio"]["ports"])
    assert backend["MEDIA_ALLOW_PRIVATE_NETWORKS"] == "false"
    assert compose(base_env(MEDIA_ALLOW_PRIVATE_NETWORKS="10.0.0.0/8"))["services"]["backend"]["environment"][
        "MEDIA_ALLOW_PRIVATE_NETWORKS"] == "10.0.0.0/8"                           # passed through
    # each of these Label Studio settings is explained by the comment line right above it
    lines = _text(COMPOSE).splitlines()
    for key in ("ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED", "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN",
                "LABEL_STUDIO_USER_TOKEN", "LABEL_STUDIO_HOST", "LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD"):
        n = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:"))
        assert lines[n - 1].strip().startswith("#"), f"{key} has no comment above it in {COMPOSE}"


def test_backend_and_trainer_share_the_queue_the_model_dir_and_the_model():
    services = compose()["services"]
    envs = {s: environment(services[s]) for s in MODEL_SERVICES}
    for name, env in envs.items():
        url = urlsplit(env["DATASTORE_URL"])
        assert url.scheme == "postgresql" and url.hostname == "postgres", name
        assert url.password == base_env()["POSTGRES_PASSWORD"] and url.path == "/" + environment(
            services["postgres"])["POSTGRES_DB"]
        assert env["MODEL_DIR"] == "/data/model_dir"
    model_keys = {k for k in envs["trainer"] if k not in ("LOG_LEVEL",)}
    assert {k: envs["backend"][k] for k in model_keys} == {k: envs["trainer"][k] for k in model_keys}
    assert {"SSP_SAM_VARIANT", "SSP_SAM_WEIGHTS_DIR", "DEVICE", "DTYPE", "HF_HOME", "HF_TOKEN",
            "HF_ENDPOINT"} <= model_keys
    assert "LABEL_STUDIO_API_KEY" not in envs["trainer"]                         # the trainer never calls Label Studio
    from backend.learning.datastore.engines import resolve_target
    assert resolve_target(envs["backend"]["DATASTORE_URL"], Path("model_dir"), None).display()  # a URL it accepts
    # outside compose the default stays SQLite
    from backend.config import BackendConfig
    assert BackendConfig.from_env({}).datastore_url is None


def test_gpu_override_builds_cuda_and_reserves_nvidia_gpus():
    base, override, merged = compose(), compose(name=COMPOSE_GPU), gpu_compose()
    assert set(override["services"]) <= set(base["services"])
    assert "cuda" in target_values()
    for name in MODEL_SERVICES:
        service = merged["services"][name]
        assert service["build"]["args"]["TARGET"] == "cuda" and service["build"]["context"] == "."
        assert service["image"] != base["services"][name]["image"]
    for name in ("backend", "trainer"):
        devices = merged["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
        assert environment(merged["services"][name])["DEVICE"] == "cuda"
        assert environment(merged["services"][name])["DATASTORE_URL"] == environment(base["services"][name])[
            "DATASTORE_URL"]                                                     # the rest of the service is kept
    assert "deploy" not in merged["services"]["label-studio"]


def test_compose_passes_only_variables_the_code_reads_and_backend_md_documents():
    passed = set()
    for doc in (compose(), gpu_compose()):
        for name in MODEL_SERVICES:
            passed |= set(environment(doc["services"][name]))
    undocumented = passed - documented_names()
    unread = passed - read_somewhere()
    check_missing(unread | undocumented, "passed to backend/trainer/datastore-upgrade but not read by the code or a "
                                         "library (docs/backend.md), or not documented in docs/backend.md")


def test_compose_defaults_are_the_codes_defaults():
    """With nothing set, the backend runs as the code's defaults say, except the settings COMPOSE_FIXES (each commented
    in docker-compose.yml)."""
    from backend.config import BackendConfig
    env = environment(compose()["services"]["backend"])
    assert set(COMPOSE_FIXES) <= set(env)
    defaults = {k: v for k, v in env.items() if k not in COMPOSE_FIXES}
    assert BackendConfig.from_env(defaults) == BackendConfig.from_env({})
    fixed = BackendConfig.from_env(env)
    assert (fixed.host, fixed.port, fixed.model_dir, fixed.preload_model) == ("0.0.0.0", 9090, "/data/model_dir", True)
    assert dockerfile_env()["MODEL_DIR"] == env["MODEL_DIR"] and dockerfile_env()["HF_HOME"] == env["HF_HOME"]
    assert str(fixed.port) == dockerfile("EXPOSE")[-1] == dockerfile_env()["PORT"]


def test_trainer_command_parses_and_keeps_finetune_defaults():
    from backend.learning.finetune import config_from_args
    argv = as_argv(compose()["services"]["trainer"]["command"])[1:]
    ns, error = parse_ssp_sam(argv)
    assert ns is not None, error
    assert ns.watch
    plain, _ = parse_ssp_sam(["finetune", "--watch"])
    assert config_from_args(ns, env={}) == config_from_args(plain, env={})
    # every FINETUNE_* variable reaches an option of the command
    raw = " ".join(as_argv(raw_compose()["services"]["trainer"]["command"]))
    assert {n for n in compose_variables() if n.startswith("FINETUNE_")} == set(re.findall(r"(FINETUNE_\w+)", raw))


# ------------------------------------------------------------------------------------------------------ .env.example

def test_env_example_names_are_read_and_explained():
    entries = env_example()
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert not [e["name"] for e in entries if not e["explained"]], "every variable needs a comment line above it"
    known = read_somewhere() | compose_variables(COMPOSE) | compose_variables(COMPOSE_GPU)
    check_missing(set(names) - known, ".env.example lists variables neither the code, a library nor Compose reads")


def test_env_example_is_complete():
    names = {e["name"] for e in env_example()}
    interpolated = compose_variables(COMPOSE) | compose_variables(COMPOSE_GPU)
    assert not interpolated - names, f"Compose interpolates these, .env.example lacks them: {interpolated - names}"
    assert not documented_names() - names, f"docs/backend.md documents these, .env.example lacks them: " \
                                           f"{documented_names() - names}"
    assert {"SSP_SAM_WEIGHTS_DIR", "AUTO_DOWNLOAD", "SSP_SAM_DATASET", "SAM_WEIGHTS_URL", "CLIP_WEIGHTS_URL"} <= names


def test_env_example_shows_the_defaults_that_apply():
    entries = env_example()
    required = required_variables(COMPOSE) | required_variables(COMPOSE_GPU)
    active = {e["name"] for e in entries if e["active"]}
    assert active == required, "only the required variables are set; every other line is commented out"
    assert all(not e["value"] for e in entries if e["active"]), "required values stay empty in the example"
    # setting every variable to what .env.example shows changes nothing in docker-compose.yml
    shown = {e["name"]: e["value"] for e in entries if not e["active"]}
    assert compose(base_env(**shown)) == compose(base_env())
    # and a required one left empty stops Compose
    with pytest.raises(MissingVariable):
        compose({})


# ------------------------------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_copies_exist_and_are_not_ignored():
    patterns = dockerignore_patterns()
    sources = []
    for args in dockerfile("COPY") + dockerfile("ADD"):
        argv = shlex.split(args)
        if any(a.startswith("--from") for a in argv):
            continue
        sources += [a for a in argv[:-1] if not a.startswith("--")]
    assert {"requirements.txt", "pyproject.toml", "README.md", "ssp_sam", "backend"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for kept_out in (".git", ".venv", ".venv-ls", "model_dir", ".env", "tests", "ssp_sam/__pycache__/x.pyc"):
        assert ignored(kept_out, patterns), f".dockerignore lets {kept_out} into the build context"


def test_compose_build_contexts_and_arguments_exist():
    args, targets = dockerfile_args(), target_values()
    for doc in (compose(), gpu_compose()):
        for name, service in doc["services"].items():
            build = service.get("build")
            if not build:
                continue
            assert (ROOT / build["context"]).is_dir()
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
            assert set(build.get("args", {})) <= set(args), f"{name}: build args the Dockerfile does not declare"
            assert build["args"]["TARGET"] in targets
    assert args["TARGET"] == "cpu" and targets == {"cpu", "cuda"}
    assert compose()["services"]["backend"]["build"]["args"]["TARGET"] == "cpu"


def test_dockerfile_installs_torch_at_the_pins_of_requirements():
    instructions = " ".join(args for _, args in dockerfile_instructions())
    assert not re.search(r"torch(vision)?\s*==", instructions), "the torch pins are read from requirements.txt"
    requirements = [line.split("#")[0].strip() for line in _text("requirements.txt").splitlines()]
    pins = {line for line in requirements if re.match(r"^torch(vision)?==", line)}
    assert len(pins) == 2
    runs = [r for r in dockerfile("RUN") if "requirements.txt" in r and "grep" in r]
    assert runs, "torch is installed from the pins of requirements.txt"
    for run in runs:
        pattern = re.search(r"grep -E '([^']+)' requirements\.txt", run).group(1)
        assert {line for line in requirements if re.search(pattern, line)} == pins
    cpu = next(r for r in runs if "--index-url" in r)
    assert "TORCH_CPU_INDEX_URL" in cpu and dockerfile_args()["TORCH_CPU_INDEX_URL"].startswith("https://")
    assert any("pip install -r requirements.txt" in r for r in dockerfile("RUN"))


def test_dockerfile_image_shape():
    user = dockerfile("USER")
    assert user and user[-1] not in ("root", "0"), "the image runs as a non-root user"
    assert "/health" in dockerfile("HEALTHCHECK")[-1] and "curl" in dockerfile("HEALTHCHECK")[-1]
    assert json.loads(dockerfile("CMD")[-1]) == ["ssp-sam", "serve"]
    volumes = set(json.loads(dockerfile("VOLUME")[-1]))
    assert {"/data", "/weights"} <= volumes
    env = dockerfile_env()
    assert any(env["MODEL_DIR"].startswith(v + "/") for v in volumes) and env["HOST"] == "0.0.0.0"
    # the ssp-sam commands of RUN, with the build arguments at their defaults and an official variant to bake
    from ssp_sam.build import VARIANTS
    assert VARIANTS["ssp-sam-336"].official
    build_args = {k: v or "" for k, v in dockerfile_args().items()} | {"BAKE_VARIANT": "ssp-sam-336"}
    commands = [shlex.split(interpolate(m, build_args))
                for r in dockerfile("RUN") for m in re.findall(r"ssp-sam ([a-z][^;&|]*)", r)]
    assert commands, "the RUN that bakes the weights calls ssp-sam"
    check_ssp_sam_commands([["serve"]] + commands, "Dockerfile")


def test_baked_weights_are_where_compose_and_the_image_look():
    bake = next(r for r in dockerfile("RUN") if "download-weights" in r)
    out = re.search(r"--out (\S+)", bake).group(1)
    assert "$BAKE_VARIANT" in bake and "$BAKE_DATASET" in bake
    assert dockerfile_env()["SSP_SAM_WEIGHTS_DIR"] == "${BAKE_VARIANT:+%s}" % out
    assert dockerfile_env()["SSP_SAM_VARIANT"] == "${BAKE_VARIANT:-demo}"
    volumes = json.loads(dockerfile("VOLUME")[-1])
    assert not any(out.startswith(v + "/") for v in volumes), "baked weights must not sit under a volume"
    baked = environment(compose(base_env(BAKE_VARIANT="ssp-sam-336"))["services"]["backend"])
    assert (baked["SSP_SAM_VARIANT"], baked["SSP_SAM_WEIGHTS_DIR"]) == ("ssp-sam-336", out)
    plain = environment(compose()["services"]["backend"])
    assert (plain["SSP_SAM_VARIANT"], plain["SSP_SAM_WEIGHTS_DIR"]) == ("demo", "")
    chosen = environment(compose(base_env(BAKE_VARIANT="ssp-sam-336", SSP_SAM_VARIANT="ssp-sam-224",
                                          SSP_SAM_WEIGHTS_DIR="/weights/x"))["services"]["backend"])
    assert (chosen["SSP_SAM_VARIANT"], chosen["SSP_SAM_WEIGHTS_DIR"]) == ("ssp-sam-224", "/weights/x")


# ------------------------------------------------------------------------------------------------------ docs/deploy.md

def test_docs_commands_agree_with_the_dockerfile_and_compose():
    args, targets = dockerfile_args(), target_values()
    services = set(gpu_compose()["services"])
    volumes = set(json.loads(dockerfile("VOLUME")[-1]))
    port = dockerfile("EXPOSE")[-1]
    commands = doc_commands()
    ssp_sam = [argv[1:] for argv in commands if argv[0] == "ssp-sam"]
    seen_targets, unread = set(), set()
    for argv in commands:
        if argv[:2] == ["docker", "build"]:
            assert argv[-1] == ".", f"{argv}: the context is the repository"
            for item in options(argv, "--build-arg"):
                name, _, value = item.partition("=")
                assert name in args, f"{argv}: {name} is no ARG of the Dockerfile"
                if name == "TARGET":
                    assert value in targets
                    seen_targets.add(value)
            if not any(o.startswith("TARGET=") for o in options(argv, "--build-arg")):
                seen_targets.add(args["TARGET"])
            assert all(tag_ok(t) for t in options(argv, "-t", "--tag")), argv
            assert all(s.startswith("id=hf_token") for s in options(argv, "--secret")), argv
        elif argv[:2] == ["docker", "run"]:
            opts, image, command = split_docker_run(argv)
            assert tag_ok(image), f"{argv}: {image} is not the image Compose builds"
            for mount in options(opts, "-v", "--volume"):
                assert mount.split(":")[1] in volumes, f"{argv}: {mount} is no VOLUME of the Dockerfile"
            for published in options(opts, "-p", "--publish"):
                assert published.split(":")[-1] == port, f"{argv}: the image listens on {port}"
            unread |= {e.split("=")[0] for e in options(opts, "-e", "--env")} - read_somewhere()
            if command:
                assert command[0] == "ssp-sam", argv
                ssp_sam.append(command[1:])
        elif argv[:2] == ["docker", "compose"]:
            global_opts, sub, rest = split_compose(argv)
            for f in options(global_opts, "-f", "--file"):
                assert f in (COMPOSE, COMPOSE_GPU), f"{argv}: {f} is not a Compose file of the repository"
            for scaled in options(rest, "--scale"):
                assert scaled.split("=")[0] in services, argv
            if sub in ("run", "exec"):
                service, command = compose_service_and_command(rest)
                assert service in services, f"{argv}: no service {service}"
                if command and command[0] == "ssp-sam":
                    ssp_sam.append(command[1:])
            elif sub in ("logs", "up", "build", "restart", "stop", "ps"):
                named = [a for a in rest if not a.startswith("-") and "=" not in a]
                assert set(named) <= services, f"{argv}: unknown services {set(named) - services}"
    assert seen_targets == targets, "the page builds every target"
    check_ssp_sam_commands(ssp_sam, "docs/deploy.md", unread)


def test_docs_cover_the_build_arguments_services_volumes_and_commands():
    text = _text("docs/deploy.md")
    missing = [f"build argument {a}" for a in dockerfile_args() if f"`{a}`" not in text]
    missing += [f"service {s}" for s in compose()["services"] if f"`{s}`" not in text]
    missing += [f"volume {v}" for v in compose()["volumes"] if f"`{v}`" not in text]
    for name in MODEL_SERVICES:
        command = " ".join(as_argv(raw_compose()["services"][name]["command"])[:3])
        if f"`{command}" not in text:
            missing.append(f"command {command}")
    if "`" + " ".join(json.loads(dockerfile("CMD")[-1])) + "`" not in text:
        missing.append("the image's CMD")
    for needed in ("http://backend:9090", COMPOSE_GPU, ".env.example", "docker compose up -d --scale backend="):
        if needed not in text:
            missing.append(needed)
    assert not missing, f"docs/deploy.md does not mention: {missing}"


@pytest.mark.parametrize("name", ["Dockerfile", COMPOSE, COMPOSE_GPU])
def test_commands_in_the_files_comments_are_the_docs_commands(name):
    documented = doc_commands()
    in_comments = comment_commands(name)
    assert in_comments, f"{name} shows no command in its comments"
    for argv in in_comments:
        assert argv in documented, f"{name} shows `{' '.join(argv)}`, docs/deploy.md does not"


# ------------------------------------------------------------------------------------------------------ docker compose

def _compose_plugin() -> str | None:
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    run = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if run.returncode != 0:
        reason = (run.stderr or run.stdout).strip().splitlines()
        return "the docker compose plugin is not installed (`docker compose version`: " \
               f"{reason[0] if reason else run.returncode})"
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]])
def test_docker_compose_config_accepts_the_files(files, tmp_path):
    """``docker compose config`` only parses, interpolates and validates: it needs no daemon."""
    reason = _compose_plugin()
    if reason:
        pytest.skip(reason)
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in base_env().items()), encoding="utf-8")
    argv = ["docker", "compose", "--env-file", str(env_file), "--project-directory", str(ROOT)]
    for f in files:
        argv += ["-f", str(ROOT / f)]
    run = subprocess.run(argv + ["config", "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
