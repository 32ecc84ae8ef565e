import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def environment(name):
    import os
    import sys

    return os.environ.get(name), sys.executable


config = conf.replace(
    shell="/tmp/sheepdog-venv/bin/python3",  # made by the prologue
    prologue=[
        "mkdir -p /tmp/sheepdog-venv/bin",
        "ln -sf /usr/bin/python3 /tmp/sheepdog-venv/bin/python3",
        'export PATH="/tmp/sheepdog-venv/bin:$PATH"',
        "export OMP_NUM_THREADS=1",
    ],
)
print(sheepdog.map(environment, ["OMP_NUM_THREADS"], config))
# prints: [('1', '/tmp/sheepdog-venv/bin/python3')]
