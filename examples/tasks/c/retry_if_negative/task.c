/* retry_if_negative: raises RETRY while its input is negative, else returns it. */
#include <sluice.h>

sluice_result run(const sluice_json *input) {
    if (!sluice_json_is_integer(input))
        return sluice_fail("the input is not an integer");
    long long x = (long long)sluice_json_int(input);
    if (x < 0)
        return sluice_retry(-1, "%lld is negative", x);
    return sluice_ok_fmt("%lld", x);
}
