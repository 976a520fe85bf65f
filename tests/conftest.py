import pytest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + tokenizer folder built from a config (tests/tiny.py), one per test module."""
    try:
        from tiny import make_tiny_model_dir
    except ImportError:  # tests/ became a package
        from tests.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started real single-host Slurm cluster (munged + slurmctld + slurmd n1, n2); stopped after the session.

    Client commands must use ``cluster.env`` (it sets ``SLURM_CONF``) or ``cluster.run(...)``/``cluster.sbatch(...)``.
    Skips when not root or when Slurm cannot be installed.
    """
    try:
        from slurm_cluster import SlurmCluster, SlurmUnavailable
    except ImportError:  # tests/ became a package
        from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

    cluster = SlurmCluster(num_nodes=2, cpus_per_node=2)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no local Slurm cluster: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
