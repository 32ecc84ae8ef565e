import time

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def f(a, b):
    return a / b


request_id = sheepdog.map_async(f, [(1, 1), (1, 2), (2, 0)], conf)
while not sheepdog.is_finished(request_id, conf.dbfile):
    time.sleep(1)  # or do something else meanwhile
print(sheepdog.get_results(request_id, conf.dbfile, block=False))
# prints: [((1, 1), 1.0), ((1, 2), 0.5), ((2, 0), None)]
print(len(sheepdog.get_errors(request_id, conf.dbfile)))
# prints: 1
