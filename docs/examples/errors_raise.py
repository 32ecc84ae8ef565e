import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def f(a, b):
    return a / b


args = [(1, 1), (1, 0), (2, 0)]
try:
    sheepdog.map(f, args, conf, errors="raise")
except sheepdog.TaskFailedError as exc:
    for error in exc.errors:
        print(error.task_index, error.traceback.splitlines()[-1])
# prints: 2 ZeroDivisionError: division by zero
# prints: 3 ZeroDivisionError: division by zero
