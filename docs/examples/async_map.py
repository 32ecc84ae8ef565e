import time

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def f(a, b):
    return a + b


request_id = sheepdog.map_async(f, [(1, 1), (1, 2), (2, 2)], conf)
while True:
    results = sheepdog.get_results(request_id, conf.dbfile, block=False)
    if all(result is not None for _arg, result in results):
        break
    time.sleep(1)
print(results)
# prints: [((1, 1), 2), ((1, 2), 3), ((2, 2), 4)]
