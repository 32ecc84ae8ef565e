import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def f(a, b):
    return a + b


args = [(1, 1), (1, 2), (2, 2)]
print(sheepdog.map(f, args, conf))
# prints: [2, 3, 4]
