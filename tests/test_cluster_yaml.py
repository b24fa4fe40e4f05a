"""Offline checks of cluster.yaml with Ray's own config preparation and validation (no AWS, no network).

`prepare_config` merges the file with Ray's bundled AWS defaults (a local YAML) and `validate_config` checks
it against Ray's JSON schema plus its cross-field rules. What `ray up` does next (`bootstrap_aws`: IAM role,
key pair, subnets, security groups, resource detection from the instance type) needs boto3 and AWS
credentials and is not exercised here.
"""

from __future__ import annotations

import copy
import re
import socket
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.\w+$")
RAY_IMAGE = re.compile(r"^rayproject/ray(?:-ml)?:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})-(?:gpu|cu\d+)$")


@pytest.fixture(scope="module", autouse=True)
def attempts() -> list:
    """Any attempt to open a connection (to AWS or anywhere else) fails and is recorded, so a test can assert
    none was made even where Ray's code would swallow the error; module-wide, so it covers `cfg`."""
    made: list = []

    def refuse(*args, **kwargs):
        made.append(args)
        raise ConnectionRefusedError(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield made


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, merge setup commands, validate."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def cfg(raw: dict) -> dict:
    return prepared(raw)


def _project_pins() -> tuple[str, str]:
    """(pinned Ray version, Python minor version like '311') from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.replace(" ", "").startswith("ray["))
    python = re.search(r">=\s*3\.(\d+)", project["requires-python"])
    return ray_pin.split("==")[1].strip(), f"3{python.group(1)}"


def test_config_passes_rays_validation_offline(raw, cfg, attempts):
    validate_config(raw)  # complete on its own, not only after defaults are merged in
    prepared(raw)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert attempts == []  # preparing and validating the file never tried to reach AWS


def _drop_worker_node_config(c):
    del c["available_node_types"]["gpu_a10g"]["node_config"]


def _drop_head_resources(c):
    del c["available_node_types"]["head_cpu"]["resources"]


def _many_workers(c):
    c["max_workers"] = "many"


def _negative_gpu(c):
    c["available_node_types"]["gpu_a10g"]["resources"] = {"GPU": -1}


def _typo_key(c):
    c["max_wrokers"] = c.pop("max_workers")


def _unknown_docker_key(c):
    c["docker"]["gpus"] = "all"


def _unknown_head(c):
    c["head_node_type"] = "head_gpu"


def _min_over_max(c):
    c["available_node_types"]["gpu_a10g"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_it", "error", "match"),
    [
        (_drop_worker_node_config, jsonschema.ValidationError, "node_config"),
        (_drop_head_resources, jsonschema.ValidationError, "resources"),
        (_many_workers, jsonschema.ValidationError, "many"),
        (_negative_gpu, jsonschema.ValidationError, "-1"),
        (_typo_key, jsonschema.ValidationError, "max_wrokers"),
        (_unknown_docker_key, jsonschema.ValidationError, "gpus"),
        (_unknown_head, ValueError, "head_node_type"),
        (_min_over_max, ValueError, "min_workers"),
    ],
)
def test_broken_copies_are_rejected(raw, break_it, error, match):
    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises(error, match=match):
        prepared(broken)


def test_missing_provider_is_rejected(raw):
    broken = {k: v for k, v in raw.items() if k != "provider"}
    with pytest.raises(KeyError, match="provider"):
        prepared(broken)


def test_head_offers_no_cpu_for_trials(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0  # filled in by prepare_config: no extra nodes of the head's type
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus" not in start or "--num-cpus=0" in start  # nothing contradicts the override


def test_workers_are_autoscaling_gpu_instances(cfg):
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert GPU_INSTANCE.match(node["node_config"]["InstanceType"]), name
        assert node["min_workers"] == 0, name  # no idle GPU bills
        assert 1 <= node["max_workers"] <= cfg["max_workers"], name
        assert node["resources"] == {}, name  # CPU/GPU/memory detected from the instance type
        image_id = node["node_config"]["ImageId"]  # not Ray's default AMI, whose driver predates CUDA 12
        assert image_id.startswith("ami-") or "nvidia-driver" in image_id, name


def test_every_node_installs_the_mounted_project(cfg):
    # `ray up` runs from the repository root, so that is what a relative local path must point at.
    project = [remote for remote, local in cfg["file_mounts"].items() if (ROOT / local).resolve() == ROOT]
    assert len(project) == 1, "the repository root must be mounted exactly once"
    assert (ROOT / "pyproject.toml").is_file()
    install = re.compile(rf"\bpip install\b.* -e {re.escape(project[0])}/?$")
    # prepare_config prepends the shared setup_commands to both the head's and the workers' lists.
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        assert any(install.search(c) for c in commands)
    assert ".gitignore" in cfg["rsync_filter"]  # .venv, caches and runs stay local
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def test_ray_image_matches_installed_ray_and_project_pins(cfg):
    docker = cfg["docker"]
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [n.get("docker", {}).get("worker_image") for n in cfg["available_node_types"].values()]
    ray_pin, python_tag = _project_pins()
    assert ray.__version__ == ray_pin
    for image in filter(None, images):
        match = RAY_IMAGE.match(image)
        assert match, f"not a versioned rayproject GPU image: {image}"
        assert match["ray"] == ray.__version__
        assert match["py"] == python_tag


def test_dashboard_listens_on_loopback_only(cfg):
    head_start = [c for c in cfg["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head_start) == 1
    assert "--dashboard-host=127.0.0.1" in head_start[0]
    everything = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "0.0.0.0" not in everything


def test_nothing_secret_in_the_file(raw):
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"aws_(secret_)?access_key", text, re.IGNORECASE)
    assert set(raw["auth"]) == {"ssh_user"}  # Ray creates and manages the SSH key pair itself
    for node in raw["available_node_types"].values():
        assert "KeyName" not in node["node_config"]


IAM_NAME = re.compile(r"^[\w+=,.@-]{1,128}$")
INSTANCE_PROFILE_ARN = re.compile(
    r"^arn:aws:iam::(\d{12}|ACCOUNT_ID):instance-profile/(?:[\w+=,.@-]+/)*(?P<name>[\w+=,.@-]+)$"
)


def test_workers_declare_the_instance_profile_that_lets_them_write_results(raw, cfg):
    """Trials on the workers write to s3:// with the workers' own IAM role; `ray up` fills in the head's only."""
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    text = CLUSTER_YAML.read_text()
    for name, node in workers.items():
        profile = node["node_config"].get("IamInstanceProfile")
        assert isinstance(profile, dict) and len(profile) == 1, f"{name}: IamInstanceProfile needs Name or Arn"
        if "Arn" in profile:
            match = INSTANCE_PROFILE_ARN.match(profile["Arn"])
            assert match, f"{name}: not an instance-profile ARN: {profile['Arn']}"
            profile_name = match["name"]
        else:
            profile_name = profile["Name"]
            assert IAM_NAME.match(profile_name), f"{name}: not an IAM name: {profile_name!r}"
        assert f"role/{profile_name}" in text  # the set-up comment lets the head pass this role to workers
        assert raw["available_node_types"][name]["node_config"]["IamInstanceProfile"] == profile
    head = raw["available_node_types"][raw["head_node_type"]]["node_config"]
    assert "IamInstanceProfile" not in head  # `ray up` creates and attaches the head's own role


def test_what_ray_submit_runs_on_the_head_joins_the_cluster_with_its_token(cfg, tmp_path):
    """The head's set-up exports RAY_ADDRESS=auto and RAY_AUTH_MODE=token into ~/.bashrc, once however often `ray up`
    runs it, and the login shell Ray wraps every `ray submit`/`ray exec` command in (its own function) sees both."""
    import os
    import subprocess

    from ray.autoscaler._private.command_runner import _with_interactive

    exports = [c for c in cfg["head_setup_commands"] if "RAY_ADDRESS" in c]
    assert len(exports) == 1
    assert not any("RAY_ADDRESS" in c for c in cfg["worker_setup_commands"])  # workers join by $RAY_HEAD_IP
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    for _ in range(2):
        subprocess.run(["bash", "-c", exports[0]], env=environ, check=True, timeout=60)
    assert (tmp_path / ".bashrc").read_text().count("RAY_ADDRESS") == 1
    command = " ".join(_with_interactive('echo "[$RAY_ADDRESS $RAY_AUTH_MODE]"'))
    shown = subprocess.run(["bash", "-c", command], env=environ, capture_output=True, text=True, timeout=60)
    assert "[auto token]" in shown.stdout
    header = CLUSTER_YAML.read_text().split("cluster_name:")[0]
    assert "ray submit cluster.yaml search.py -- --storage-path" in header  # the headline needs no --address


def test_every_node_starts_ray_with_token_authentication_and_the_one_token(cfg):
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    # the token Ray reads by default (~/.ray/auth_token, the image's user is ray) comes from the user's machine
    mounts = {remote: local for remote, local in cfg["file_mounts"].items() if remote.endswith("/.ray/auth_token")}
    assert mounts == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    assert "ray get-auth-token --generate" in CLUSTER_YAML.read_text().split("cluster_name:")[0]
