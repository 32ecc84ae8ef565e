import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def square(x):
    return x * x


print(sheepdog.map(square, range(4), conf, verbose=False, cache=True))
# prints: [0, 1, 4, 9]

# Two new arguments: only they are submitted; the rest come from the cache.
request_id = sheepdog.map_async(square, range(6), conf, cache=True)
print([result for _, result in sheepdog.get_results(request_id, conf.dbfile)])
# prints: [0, 1, 4, 9, 16, 25]
with sheepdog.Storage(conf.dbfile) as storage:
    print(storage.count_cached(request_id), "from the cache")
# prints: 4 from the cache
