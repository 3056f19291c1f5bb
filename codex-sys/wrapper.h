#include <stdbool.h>
#include "libcodex.h"
