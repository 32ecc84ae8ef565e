import math

import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def g(x):
    return m.sqrt(x)


def f(x):
    import math as m  # Sheepdog 0.2's idiom still works ...

    global m
    return g(x)


def h(x):
    return math.sqrt(x)  # ... but a module imported at the top goes by itself


print(sheepdog.map(f, [4.0, 9.0], conf), sheepdog.map(h, [16.0], conf))
# prints: [2.0, 3.0] [4.0]
