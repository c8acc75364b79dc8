# Rewrites every proto3 `optional T name = N;` of IN into the wire-identical
# one-field oneof `oneof _name { T name = N; }` and writes OUT (protoc-c 1.4
# does not support proto3 optional). Run with cmake -DIN=... -DOUT=... -P.
file(READ ${IN} text)
string(REGEX REPLACE "\n([ ]*)optional ([A-Za-z0-9_.]+) ([a-z0-9_]+) = ([0-9]+)([^;\n]*);"
       "\n\\1oneof _\\3 { \\2 \\3 = \\4\\5; }" text "${text}")
file(WRITE ${OUT} "${text}")
