import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def inverse(x):
    return 1 / x


results = sheepdog.map(inverse, [1, 0, 4], conf, verbose=False)
print(results)
# prints: [1.0, None, 0.25]

request_id = sheepdog.map_async(inverse, [2, 0], conf)
print(sheepdog.get_results(request_id, conf.dbfile))
# prints: [(2, 0.5), (0, None)]
for arg, error in sheepdog.get_errors(request_id, conf.dbfile):
    print(arg, error.type_name, error.message)
    # error.traceback holds the remote traceback, error.host the node
# prints: 0 ZeroDivisionError division by zero

try:
    sheepdog.map(inverse, [0], conf, errors="raise")
except sheepdog.TaskFailedError as failed:
    print(type(failed.errors[0]).__name__, failed.errors[0].type_name)
# prints: RemoteError ZeroDivisionError
