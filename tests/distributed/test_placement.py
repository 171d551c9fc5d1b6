"""Resource attributes from SLURM, Kubernetes and torchrun environments, as their tools set them."""

from __future__ import annotations

import pytest

from karn_otel.distributed import placement

# What `srun` sets for task 5 of a 2-node, 8-task array job (values from a real job's env).
SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "morph-sweep",
    "SLURM_JOB_NODELIST": "gpu-[01-02]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_PARTITION": "h200",
    "SLURM_ARRAY_JOB_ID": "4240",
    "SLURM_ARRAY_TASK_ID": "2",
}
K8S_ENV = {
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    "HOSTNAME": "trainer-0-abcde",
    "POD_NAMESPACE": "research",
    "NODE_NAME": "node-7",
    "JOB_NAME": "trainer",
}
TORCHRUN_ENV = {
    "TORCHELASTIC_RUN_ID": "none",
    "LOCAL_RANK": "3",
    "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "TORCHELASTIC_RESTART_COUNT": "0",
}


def test_slurm():
    a = placement.detect(SLURM_ENV)
    assert a == {
        "slurm.job.id": "4242",
        "slurm.job.name": "morph-sweep",
        "slurm.job.node_list": "gpu-[01-02]",
        "slurm.job.num_nodes": 2,
        "slurm.task.id": 5,
        "slurm.task.local_id": 1,
        "slurm.node.id": 1,
        "slurm.partition": "h200",
        "slurm.array.job_id": "4240",
        "slurm.array.task_id": 2,
    }


def test_kubernetes_with_the_namespace_file(tmp_path):
    ns = tmp_path / "namespace"
    ns.write_text("from-file\n")
    env = {k: v for k, v in K8S_ENV.items() if k != "POD_NAMESPACE"}
    a = placement.kubernetes(env, namespace_file=ns)
    assert a == {"k8s.pod.name": "trainer-0-abcde", "k8s.namespace.name": "from-file", "k8s.node.name": "node-7",
                 "k8s.job.name": "trainer"}  # fmt: skip
    assert placement.kubernetes(K8S_ENV)["k8s.namespace.name"] == "research"


def test_torchrun_and_layout():
    env = {**TORCHRUN_ENV, "KARN_TP_RANK": "1", "KARN_TP_SIZE": "2", "KARN_DP_RANK": "3", "KARN_DP_SIZE": "4"}
    a = placement.detect(env)
    assert a["karn.dl.local_rank"] == 3 and a["karn.dl.node_rank"] == 1 and a["karn.dl.local_world_size"] == 4
    assert a["karn.dl.tp.rank"] == 1 and a["karn.dl.tp.size"] == 2 and a["karn.dl.dp.size"] == 4
    assert "karn.dl.pp.rank" not in a


def test_nothing_outside_a_scheduler_and_malformed_values_left_out():
    assert placement.detect({"HOME": "/root"}) == {}
    a = placement.detect({"SLURM_JOB_ID": "7", "SLURM_PROCID": "x", "KARN_TP_RANK": "5", "KARN_TP_SIZE": "2"})
    assert a == {"slurm.job.id": "7"}  # a bad task id and an impossible layout are dropped, not raised


def test_layout_validation():
    with pytest.raises(ValueError):
        placement.ParallelLayout(tp_rank=2, tp_size=2)
    assert placement.ParallelLayout(pp_rank=0, pp_size=4).attributes() == {"karn.dl.pp.rank": 0, "karn.dl.pp.size": 4}
