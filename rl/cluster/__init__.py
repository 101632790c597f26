"""The Ray actors of a run, as four named pieces, started and stopped together by `Workers`
(rl/cluster/workers.py):

    Placement      where each actor goes (rl/cluster/placement.py)
    EnginePool     the rollout engines: start, restart, route requests (rl/cluster/engine_pool.py)
    TrainerGroup   the trainer ranks: rendezvous, train, checkpoints (rl/cluster/trainer_group.py)
    WeightSync     trainer -> engines, in place, per version (rl/weight_sync/sync.py)

and the connection to Ray itself (rl/cluster/ray_session.py).
"""
