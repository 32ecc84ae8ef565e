import sys

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def noisy(x):
    print("working on", x)
    print("a warning about", x, file=sys.stderr)
    return x * 2


request_id = sheepdog.map_async(noisy, [1, 2, 3], conf)
print(sheepdog.get_results(request_id, conf.dbfile))
# prints: [(1, 2), (2, 4), (3, 6)]
stdout, stderr = sheepdog.get_output(request_id, 3, conf.dbfile)
print(repr(stdout), repr(stderr))
# prints: 'working on 3\n' 'a warning about 3\n'
