from concurrent.futures import as_completed

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def simulate(seed, steps=1000):
    position = 0
    for step in range(steps):
        position += 1 if (seed + step) % 3 else -1
    return seed, position


with sheepdog.Executor(conf) as pool:
    futures = [pool.submit(simulate, seed, steps=5000) for seed in range(3)]
    positions = {}
    for future in as_completed(futures):  # in the order they finish
        seed, position = future.result()
        positions[seed] = position
    print(sorted(positions.items()))
    # prints: [(0, 1666), (1, 1668), (2, 1666)]

    # map keeps the order; timeout bounds the whole iteration
    print(list(pool.map(sum, [[1, 2], [3, 4]], timeout=600)))
    # prints: [3, 7]

    # chunksize puts several calls in one task: here 2 tasks of 3 calls
    print(list(pool.map(pow, range(6), [2] * 6, chunksize=3)))
    # prints: [0, 1, 4, 9, 16, 25]
