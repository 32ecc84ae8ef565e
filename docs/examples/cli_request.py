import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def f(a, b):
    print("f got", a, b)
    return a + b if a * b < 4 else 1 / 0


print(sheepdog.map(f, [(1, 1), (1, 2), (2, 2)], conf, verbose=False))
# prints: [2, 3, None]
