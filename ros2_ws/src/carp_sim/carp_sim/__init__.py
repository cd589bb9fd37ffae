"""carp_sim: MuJoCo twin of the UR5e cell.

Scene, tasks and success checks, scripted experts, demonstration collection.
"""
