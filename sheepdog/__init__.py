"""sheepdog: run a Python function over many arguments as a Grid Engine array job."""
