from _conf import conf

# --8<-- [example]
import sheepdog

sheepdog.serialisation.pickle_protocol = 2
print(sheepdog.map(lambda x: {x: [x]}, [1, 2], conf))
# prints: [{1: [1]}, {2: [2]}]
