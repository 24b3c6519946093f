/* add_one: returns its input plus one. */
#include <sluice.h>

sluice_result run(const sluice_json *input) {
    if (!sluice_json_is_integer(input))
        return sluice_fail("the input is not an integer");
    return sluice_ok_fmt("%lld", (long long)sluice_json_int(input) + 1);
}
