import sheepdog

conf = sheepdog.Config.from_file("cluster.json")  # see Getting started

sheepdog.serialisation.pickle_protocol = 2
print(sheepdog.map(lambda x: {x: [x]}, [1, 2], conf))
# prints: [{1: [1]}, {2: [2]}]
