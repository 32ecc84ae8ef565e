import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started

constant = 12


def g(x):
    return x * 2


def f(a, b):
    return a + g(b) + constant


args = [(1, 2), (2, 3), (3, 4)]
namespace = {"constant": constant, "g": g}
print(sheepdog.map(f, args, conf, ns=namespace))
# prints: [17, 20, 23]
print(sheepdog.map(f, args, conf))  # g and constant are found by themselves
# prints: [17, 20, 23]
