"""carp_bringup: Launch files, YAML parameters, the stack runner and the evaluation protocol."""
