from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_has_gpu_workers_and_installs_the_gpu_extra():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert sorted(t["resources"].get("GPU", 0) for t in types.values()) == [0, 1, 4, 8]
    assert all(t["min_workers"] <= t["max_workers"] for t in types.values())
    # The setup installs this project, with the extra that pyproject.toml really defines.
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'gpu = [' in pyproject
    assert any('pip install -e "~/clsjob[gpu]"' in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["~/clsjob"] == "."
