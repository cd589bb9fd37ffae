"""carp_sim: MuJoCo twin of the UR5e cell: scene, tasks and success checks, scripted experts, demonstration collection."""
