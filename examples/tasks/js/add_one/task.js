// add_one: returns its input plus one.
export function run(x) {
  return x + 1;
}
