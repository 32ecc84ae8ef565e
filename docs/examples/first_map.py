import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started


def square_where(x):
    import socket

    return x * x, socket.gethostname()


results = sheepdog.map(square_where, range(5), conf)
print([square for square, _host in results])
# prints: [0, 1, 4, 9, 16]
print(sorted({host for _square, host in results}))  # the nodes that ran them
