"""The local Slurm harness (tests/slurm_cluster.py) really schedules across two nodes, signals and requeues."""

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_node_srun(slurm_cluster, tmp_path):
    out = tmp_path / "out.txt"
    script = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1
#SBATCH --time=1
srun bash -c 'echo "$SLURM_NODEID $SLURM_PROCID $(hostname) $SLURMD_NODENAME"'
"""
    job = slurm_cluster.sbatch(script, "-o", str(out), cwd=tmp_path)
    assert slurm_cluster.wait(job, timeout=30) == "COMPLETED", out.read_text() if out.exists() else ""
    rows = [line.split() for line in out.read_text().splitlines() if line.strip()]
    assert len(rows) == 2, rows
    assert {r[0] for r in rows} == {"0", "1"}  # SLURM_NODEID
    assert {r[1] for r in rows} == {"0", "1"}  # SLURM_PROCID
    assert {r[3] for r in rows} == {"n1", "n2"}  # SLURMD_NODENAME
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", info


def test_usr1_then_self_requeue(slurm_cluster, tmp_path):
    out, marker, ready = tmp_path / "out.txt", tmp_path / "marker", tmp_path / "ready"
    script = f"""#!/bin/bash
#SBATCH --nodes=1 --ntasks=1 --open-mode=append --time=1
echo "start restart=${{SLURM_RESTART_COUNT:-0}}"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "done restart=$SLURM_RESTART_COUNT"; exit 0; fi
on_usr1() {{ echo got-usr1; touch {marker}; scontrol requeue "$SLURM_JOB_ID"; exit 0; }}
trap on_usr1 USR1
touch {ready}
while true; do sleep 0.2 & wait $!; done
"""
    job = slurm_cluster.sbatch(script, "-o", str(out), cwd=tmp_path)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, f"job never started: {slurm_cluster.job_info(job)}"
        time.sleep(0.1)
    slurm_cluster.signal(job, "USR1")
    assert slurm_cluster.wait(job, timeout=40) == "COMPLETED", out.read_text()
    assert marker.exists()
    lines = out.read_text().splitlines()
    assert lines[:2] == ["start restart=0", "got-usr1"], lines
    assert "start restart=1" in lines and "done restart=1" in lines, lines
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
