import pytest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + tokenizer folder built from a config (tests/tiny.py), one per test module."""
    try:
        from tiny import make_tiny_model_dir
    except ImportError:  # tests/ became a package
        from tests.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A tiny model trained through the command line (1 process, 4 steps, with a final evaluation): its export
    (<output_dir>/final) carries the scoring contract and reward statistics."""
    try:
        from launch import run_train, tiny_recipe
    except ImportError:  # tests/ became a package
        from tests.launch import run_train, tiny_recipe

    tmp = tmp_path_factory.mktemp("export")
    recipe, _ = tiny_recipe(tmp, data={"train": ["rm_scale:demo/train"], "eval": ["rm_scale:demo/eval"]},
                            max_steps=4, learning_rate=2e-3, per_device_train_batch_size=8, max_length=64)
    run_train(recipe, ["--output_dir", str(tmp / "run")])
    return tmp / "run" / "final"


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
