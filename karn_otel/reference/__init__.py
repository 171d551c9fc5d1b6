"""A compact, real morphogenetic training system: the emitters Karn is built against.

Roles from the design document: Kasmina (slots.py: seed lifecycle, gates, blending,
isolation), Tolaria (trainer.py: the host trainer), Tamiyo (controller.py: the heuristic
controller), Simic (ppo.py: PPO training of the controller). It reports only through Karn.
"""
