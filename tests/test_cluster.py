"""cluster.yaml: valid for Ray's own launcher schema, elastic GPU workers, pinned Ray, no exposed dashboard."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _ray_pin() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^ray(\[[^\]]*\])?==([\w.]+)\s*$", line.strip())
        if m:
            return m.group(2)
    raise AssertionError("requirements.txt pins no ray version")


def test_validates_against_rays_launcher_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # raises jsonschema.ValidationError when malformed
    broken = dict(cluster, max_workerz=3)
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(prepare_config(broken))


def test_aws_provider_and_node_types(cluster):
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "head should be a CPU node"
    gpu = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    assert {v["node_config"]["InstanceType"] for v in gpu.values()} >= {"g5.xlarge", "g4dn.xlarge"}
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name} must scale from zero"
        assert 1 <= t["max_workers"] <= cluster["max_workers"]
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "IamInstanceProfile" in t["node_config"], f"{name} needs S3 access for an s3:// run_dir"
    assert cluster["idle_timeout_minutes"] > 0


def test_ray_version_equals_requirements(cluster):
    pin = _ray_pin()
    images = [cluster["docker"]["head_image"], cluster["docker"]["worker_image"]]
    for image in images:
        tag = image.split(":", 1)[1]
        assert tag.split("-")[0] == pin, f"{image} runs Ray {tag.split('-')[0]}, requirements.txt pins {pin}"
    setup = " ".join(cluster["setup_commands"])
    assert "pip install -q -r requirements.txt" in setup and "pip install -q -e ." in setup
    for cmd in cluster["setup_commands"] + cluster.get("head_setup_commands", []) + cluster.get(
            "worker_setup_commands", []):
        for m in re.finditer(r"ray(?:\[[^\]]*\])?==([\w.]+)", cmd):
            assert m.group(1) == pin


def test_dashboard_not_exposed(cluster):
    head_cmds = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text().split("head_start_ray_commands")[1]


def test_token_auth_on_every_node_with_one_shared_token(cluster):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
