! nrel5mw.f90 - the NREL 5-MW baseline torque and pitch controller as a
! Bladed-style shared library (Jonkman et al., NREL/TP-500-38060, 2009, ch. 7).
!
! A real controller of the kind people run: Fortran built with gfortran, string
! arguments through ISO_C_BINDING, state that lives across calls (SAVE), and
! gains read from an input file on the first call.
!
! Entry point: DISCON(avrSWAP, aviFAIL, accINFILE, avcOUTNAME, avcMSG).
!
! Records (1-based) read: 1 status (0 first call, 1 step, -1 last), 3 time step
! (s), 4/33/34 blade pitch (rad), 20 generator speed (rad/s), 49 avcMSG size,
! 50 accINFILE length (+1 for the NUL).
! Records written: 35 = 1 (generator contactor), 36 = 0 (shaft brake), 42-44
! per-blade pitch command (rad), 45 collective pitch command (rad), 47 generator
! torque demand (N.m), 55 = 0 and 56 = 0 (override flags), 65 = 0 (logging
! channels).
!
! The input file (accINFILE) holds 17 parameters, one per line, in a fixed
! order, as "value  name  ! description"; blank lines and lines starting with
! '!' or '#' are comments. See tests/data/nrel5mw/DISCON.IN.
!
! Errors set aviFAIL = -1 and a NUL-terminated reason (at most record 49 bytes)
! in avcMSG: input file missing or malformed, a step before a successful first
! call, a non-positive time step. Internally all arithmetic is double precision
! and nothing depends on anything but the inputs, so the same calls give
! bit-identical outputs.
subroutine DISCON(avrSWAP, aviFAIL, accINFILE, avcOUTNAME, avcMSG) bind(C, name='DISCON')
  use, intrinsic :: iso_c_binding, only: c_float, c_int, c_char, c_double, c_null_char, &
                                         c_size_t, c_ptr, c_associated
  use, intrinsic :: iso_fortran_env, only: iostat_end
  implicit none

  real(c_float), intent(inout) :: avrSWAP(*)
  integer(c_int), intent(inout) :: aviFAIL
  character(kind=c_char), intent(in) :: accINFILE(*)
  character(kind=c_char), intent(inout) :: avcOUTNAME(*)
  character(kind=c_char), intent(inout) :: avcMSG(*)

  interface
    function c_getcwd(buf, size) bind(C, name='getcwd') result(r)
      import :: c_char, c_size_t, c_ptr
      character(kind=c_char), intent(out) :: buf(*)
      integer(c_size_t), value :: size
      type(c_ptr) :: r
    end function c_getcwd
  end interface

  integer, parameter :: dp = c_double
  integer, parameter :: NPAR = 17
  integer, parameter :: NUMBL = 3
  integer, parameter :: MAX_INFILE = 4096
  character(len=*), parameter :: TAG = 'NREL5MW: '

  ! Parameter order in the input file, and what each one is (for messages).
  integer, parameter :: CORNERFREQ = 1, VS_CTINSP = 2, VS_RGN2SP = 3, VS_RGN2K = 4, &
                        VS_RTGNSP = 5, VS_RTPWR = 6, VS_SLPC = 7, VS_RGN3MP = 8, &
                        VS_MAXTQ = 9, VS_MAXRAT = 10, PC_REFSPD = 11, PC_KP = 12, &
                        PC_KI = 13, PC_KK = 14, PC_MINPIT = 15, PC_MAXPIT = 16, PC_MAXRAT = 17
  character(len=10), parameter :: PNAME(NPAR) = [character(len=10) :: &
      'CornerFreq', 'VS_CtInSp', 'VS_Rgn2Sp', 'VS_Rgn2K', 'VS_RtGnSp', 'VS_RtPwr', &
      'VS_SlPc', 'VS_Rgn3MP', 'VS_MaxTq', 'VS_MaxRat', 'PC_RefSpd', 'PC_KP', 'PC_KI', &
      'PC_KK', 'PC_MinPit', 'PC_MaxPit', 'PC_MaxRat']
  character(len=60), parameter :: PDESC(NPAR) = [character(len=60) :: &
      'generator-speed filter corner frequency, rad/s', &
      'cut-in generator speed (region 1 to 1.5), rad/s', &
      'generator speed from region 1.5 to 2, rad/s', &
      'region-2 torque gain k, N.m/(rad/s)^2', &
      'rated generator speed, rad/s', &
      'rated mechanical power, W', &
      'generator slip in region 2.5, percent', &
      'minimum pitch that forces region 3, rad', &
      'maximum generator torque, N.m', &
      'maximum generator torque rate, N.m/s', &
      'reference generator speed for pitch control, rad/s', &
      'proportional pitch gain at zero pitch, s', &
      'integral pitch gain at zero pitch, -', &
      'pitch angle at which the pitch gains halve, rad', &
      'minimum pitch command, rad', &
      'maximum pitch command, rad', &
      'maximum pitch rate, rad/s']

  ! State that lives across calls of one loaded copy.
  logical, save :: ready = .false.
  real(dp), save :: par(NPAR) = 0.0_dp
  real(dp), save :: sySp = 0.0_dp, slope15 = 0.0_dp, slope25 = 0.0_dp, trGnSp = 0.0_dp
  real(dp), save :: genSpeedF = 0.0_dp, lastGenTrq = 0.0_dp, intSpdErr = 0.0_dp
  real(dp), save :: pitCom(NUMBL) = 0.0_dp

  integer :: iStatus, k
  real(dp) :: dt, genSpeed, blPitch(NUMBL), alpha, genTrq, trqRate
  real(dp) :: gk, spdErr, pitComT, pitRate
  character(len=:), allocatable :: fname
  character(len=64) :: num

  aviFAIL = 0
  iStatus = nint(avrSWAP(1))
  dt = real(avrSWAP(3), dp)
  genSpeed = real(avrSWAP(20), dp)
  blPitch = [real(avrSWAP(4), dp), real(avrSWAP(33), dp), real(avrSWAP(34), dp)]

  if (iStatus == 0) then
    ready = .false.
    call infile_name(fname)
    if (len(fname) == 0) then
      write (num, '(I0)') nint(max(min(avrSWAP(50), 1.0e9_c_float), -1.0e9_c_float))
      call fail('no input file name: accINFILE is empty (record 50 = ' // trim(num) // &
                '); pass the path of the controller input file (ServoDyn DLL_InFile), '// &
                'e.g. DISCON.IN')
      return
    end if
    if (.not. read_infile(fname)) return
    if (.not. derive(fname)) return
  else if (.not. ready) then
    write (num, '(I0)') iStatus
    call fail('called with status ' // trim(num) // ' (record 1) before a successful first '// &
              'call with status 0; the controller is not initialised: fix the error '// &
              'reported by the first call and restart the simulation')
    return
  end if

  if (.not. (dt > 0.0_dp .and. dt <= huge(dt))) then
    write (num, '(G0)') avrSWAP(3)
    call fail('record 3 (communication interval) is ' // trim(num) // &
              ' s; expected a positive time step in seconds')
    ready = .false.
    return
  end if

  if (iStatus == 0) then
    ! Initialise: the filter starts at the measured speed, the pitch command at
    ! the measured blade pitch, the integral term so that the PI output equals it.
    genSpeedF = genSpeed
    pitCom = blPitch
    gk = 1.0_dp / (1.0_dp + pitCom(1) / par(PC_KK))
    intSpdErr = pitCom(1) / (gk * par(PC_KI))
    ready = .true.
  else
    alpha = exp(-dt * par(CORNERFREQ))
    genSpeedF = (1.0_dp - alpha) * genSpeed + alpha * genSpeedF
  end if

  ! Variable-speed torque control.
  if (genSpeedF >= par(VS_RTGNSP) .or. pitCom(1) >= par(VS_RGN3MP)) then
    genTrq = par(VS_RTPWR) / genSpeedF                       ! region 3: constant power
  else if (genSpeedF <= par(VS_CTINSP)) then
    genTrq = 0.0_dp                                          ! region 1
  else if (genSpeedF < par(VS_RGN2SP)) then
    genTrq = slope15 * (genSpeedF - par(VS_CTINSP))          ! region 1.5
  else if (genSpeedF < trGnSp) then
    genTrq = par(VS_RGN2K) * genSpeedF * genSpeedF           ! region 2
  else
    genTrq = slope25 * (genSpeedF - sySp)                    ! region 2.5
  end if
  genTrq = min(genTrq, par(VS_MAXTQ))
  if (iStatus == 0) lastGenTrq = genTrq
  trqRate = (genTrq - lastGenTrq) / dt
  trqRate = min(max(trqRate, -par(VS_MAXRAT)), par(VS_MAXRAT))
  genTrq = lastGenTrq + trqRate * dt
  lastGenTrq = genTrq

  ! Gain-scheduled PI pitch control on the filtered speed error.
  gk = 1.0_dp / (1.0_dp + pitCom(1) / par(PC_KK))
  spdErr = genSpeedF - par(PC_REFSPD)
  intSpdErr = intSpdErr + spdErr * dt
  intSpdErr = min(max(intSpdErr, par(PC_MINPIT) / (gk * par(PC_KI))), &
                  par(PC_MAXPIT) / (gk * par(PC_KI)))
  pitComT = gk * par(PC_KP) * spdErr + gk * par(PC_KI) * intSpdErr
  pitComT = min(max(pitComT, par(PC_MINPIT)), par(PC_MAXPIT))
  do k = 1, NUMBL
    pitRate = (pitComT - blPitch(k)) / dt
    pitRate = min(max(pitRate, -par(PC_MAXRAT)), par(PC_MAXRAT))
    pitCom(k) = blPitch(k) + pitRate * dt
    pitCom(k) = min(max(pitCom(k), par(PC_MINPIT)), par(PC_MAXPIT))
  end do

  avrSWAP(35) = 1.0_c_float
  avrSWAP(36) = 0.0_c_float
  avrSWAP(42) = real(pitCom(1), c_float)
  avrSWAP(43) = real(pitCom(2), c_float)
  avrSWAP(44) = real(pitCom(3), c_float)
  avrSWAP(45) = real(pitCom(1), c_float)
  avrSWAP(47) = real(lastGenTrq, c_float)
  avrSWAP(55) = 0.0_c_float
  avrSWAP(56) = 0.0_c_float
  avrSWAP(65) = 0.0_c_float

contains

  ! aviFAIL = -1 and TAG // text in avcMSG, cut to record 49 bytes with its NUL.
  subroutine fail(text)
    character(len=*), intent(in) :: text
    aviFAIL = -1
    call set_msg(TAG // text)
  end subroutine fail

  subroutine set_msg(text)
    character(len=*), intent(in) :: text
    integer :: cap, n, i
    if (.not. (avrSWAP(49) >= 1.0_c_float)) return
    if (avrSWAP(49) > 1.0e8_c_float) then
      cap = 100000000
    else
      cap = int(avrSWAP(49))
    end if
    n = min(len(text), cap - 1)
    do i = 1, n
      avcMSG(i) = text(i:i)
    end do
    avcMSG(n + 1) = c_null_char
  end subroutine set_msg

  ! accINFILE up to its first NUL and at most record 50 - 1 characters (record 50
  ! is its length plus the NUL), trailing blanks dropped (Fortran pads with blanks).
  subroutine infile_name(name)
    character(len=:), allocatable, intent(out) :: name
    integer :: limit, n, i
    limit = MAX_INFILE
    if (avrSWAP(50) >= 1.0_c_float .and. avrSWAP(50) <= real(MAX_INFILE, c_float)) &
      limit = int(avrSWAP(50)) - 1
    n = 0
    do while (n < limit)
      if (accINFILE(n + 1) == c_null_char) exit
      n = n + 1
    end do
    do while (n > 0)
      if (accINFILE(n) /= ' ') exit
      n = n - 1
    end do
    allocate (character(len=n) :: name)
    do i = 1, n
      name(i:i) = accINFILE(i)
    end do
  end subroutine infile_name

  function working_dir() result(dir)
    character(len=:), allocatable :: dir
    character(kind=c_char) :: buf(4096)
    integer :: n, i
    if (.not. c_associated(c_getcwd(buf, int(size(buf), c_size_t)))) then
      dir = '?'
      return
    end if
    n = 0
    do while (n < size(buf))
      if (buf(n + 1) == c_null_char) exit
      n = n + 1
    end do
    allocate (character(len=n) :: dir)
    do i = 1, n
      dir(i:i) = buf(i)
    end do
  end function working_dir

  pure function lower(s) result(t)
    character(len=*), intent(in) :: s
    character(len=len(s)) :: t
    integer :: i, c
    t = s
    do i = 1, len(s)
      c = iachar(s(i:i))
      if (c >= iachar('A') .and. c <= iachar('Z')) t(i:i) = achar(c + 32)
    end do
  end function lower

  ! The expected parameter, for messages: 'VS_Rgn2K' (region-2 torque gain k, ...).
  function expected(i) result(s)
    integer, intent(in) :: i
    character(len=:), allocatable :: s
    s = "'" // trim(PNAME(i)) // "' (" // trim(PDESC(i)) // ")"
  end function expected

  ! Read the NPAR parameters of `name` into par; on error call fail and return false.
  logical function read_infile(name) result(ok)
    character(len=*), intent(in) :: name
    character(len=1024) :: line
    character(len=256) :: iom
    character(len=:), allocatable :: s, rest, token, pname_found, tail, at
    integer :: u, ios, lineno, npar_read, p, i, c
    logical :: exists
    real(dp) :: v

    ok = .false.
    s = ''
    rest = ''
    token = ''
    pname_found = ''
    tail = ''
    at = ''
    inquire (file=name, exist=exists)
    if (.not. exists) then
      call fail("cannot open input file '" // name // "': no such file (relative paths "// &
                "are resolved from the controller's working directory '" // working_dir() // &
                "'); pass the path of the controller input file (ServoDyn DLL_InFile) "// &
                "and make sure it is present where the controller runs")
      return
    end if
    inquire (file=name // '/.', exist=exists)
    if (exists) then
      call fail("cannot open input file '" // name // "': it is a directory; pass the path "// &
                "of the controller input file itself (ServoDyn DLL_InFile)")
      return
    end if
    iom = ''
    open (newunit=u, file=name, status='old', action='read', form='formatted', &
          access='sequential', iostat=ios, iomsg=iom)
    if (ios /= 0) then
      call fail("cannot open input file '" // name // "': " // trim(iom) // &
                "; it must be a readable text file (working directory '" // working_dir() // &
                "')")
      return
    end if

    lineno = 0
    npar_read = 0
    do
      iom = ''
      read (u, '(A)', iostat=ios, iomsg=iom) line
      if (ios == iostat_end) exit
      if (ios /= 0) then
        write (num, '(I0)') lineno + 1
        call fail("cannot read input file '" // name // "' at line " // trim(num) // ": " // &
                  trim(iom) // "; it must be a text file of 'value name ! description' lines")
        close (u)
        return
      end if
      lineno = lineno + 1
      do i = 1, len(line)
        c = iachar(line(i:i))
        if (c == 9 .or. c == 13) line(i:i) = ' '   ! tabs, CR of CRLF files
      end do
      s = trim(adjustl(line))
      if (len(s) == 0) cycle
      if (s(1:1) == '!' .or. s(1:1) == '#') cycle

      write (num, '(I0)') lineno
      at = "input file '" // name // "' line " // trim(num) // ": "
      if (npar_read == NPAR) then
        write (num, '(I0)') NPAR
        call fail(at // "unexpected line '" // s // "' after the " // trim(num) // &
                  " parameters; remove it or make it a comment starting with '!'")
        close (u)
        return
      end if
      npar_read = npar_read + 1

      ! value
      p = index(s, ' ')
      if (p == 0) then
        token = s
        rest = ''
      else
        token = s(1:p - 1)
        rest = trim(adjustl(s(p:)))
      end if
      ! name
      p = index(rest, ' ')
      if (p == 0) then
        pname_found = rest
        tail = ''
      else
        pname_found = rest(1:p - 1)
        tail = trim(adjustl(rest(p:)))
      end if

      if (len(pname_found) == 0) then
        call fail(at // "'" // token // "' has no parameter name; expected " // &
                  expected(npar_read) // " as 'value " // trim(PNAME(npar_read)) // &
                  " ! description'")
        close (u)
        return
      end if
      if (lower(pname_found) /= lower(trim(PNAME(npar_read)))) then
        write (num, '(I0)') NPAR
        call fail(at // "expected parameter " // expected(npar_read) // ", found '" // &
                  pname_found // "'; the " // trim(num) // " parameters must come in the "// &
                  "documented order, one 'value name ! description' per line")
        close (u)
        return
      end if
      if (len(tail) > 0) then
        if (tail(1:1) /= '!') then
          call fail(at // "unexpected text '" // tail // "' after " // &
                    trim(PNAME(npar_read)) // "; start a description with '!'")
          close (u)
          return
        end if
      end if
      if (.not. is_number(token, v)) then
        call fail(at // "value '" // token // "' of " // expected(npar_read) // &
                  " is not a number; expected a finite decimal such as 0.01882681 or 5.29661E6")
        close (u)
        return
      end if
      par(npar_read) = v
    end do
    close (u)

    if (npar_read == 0) then
      write (num, '(I0)') NPAR
      write (iom, '(I0)') lineno
      call fail("input file '" // name // "' holds no parameters (" // trim(iom) // &
                " lines, all blank or comments); expected " // trim(num) // &
                " 'value name ! description' lines, the first " // expected(1))
      return
    end if
    if (npar_read < NPAR) then
      write (num, '(I0,A,I0)') npar_read, ' of ', NPAR
      write (iom, '(I0)') lineno
      call fail("input file '" // name // "' ends after line " // trim(iom) // " with " // &
                trim(num) // " parameters: " // expected(npar_read + 1) // " is missing")
      return
    end if
    ok = .true.
  end function read_infile

  ! A plain decimal (digits, sign, point, exponent letter only; no list-directed
  ! repeat counts, separators, Inf or NaN) that reads as a finite real.
  logical function is_number(token, v) result(ok)
    character(len=*), intent(in) :: token
    real(dp), intent(out) :: v
    integer :: i, ios
    logical :: digit
    ok = .false.
    v = 0.0_dp
    digit = .false.
    do i = 1, len(token)
      select case (token(i:i))
      case ('0':'9')
        digit = .true.
      case ('+', '-', '.', 'e', 'E', 'd', 'D')
      case default
        return
      end select
    end do
    if (.not. digit) return
    read (token, *, iostat=ios) v
    if (ios /= 0) return
    if (.not. (abs(v) <= huge(v))) return
    ok = .true.
  end function is_number

  ! Check the parameters against each other and derive the region 1.5 and 2.5
  ! lines; on error call fail and return false.
  logical function derive(name) result(ok)
    character(len=*), intent(in) :: name
    character(len=:), allocatable :: bad
    real(dp) :: disc

    ok = .false.
    bad = ''
    if (.not. (par(CORNERFREQ) > 0)) then
      bad = "CornerFreq must be > 0"
    else if (.not. (par(VS_CTINSP) >= 0)) then
      bad = "VS_CtInSp must be >= 0"
    else if (.not. (par(VS_RGN2SP) > par(VS_CTINSP))) then
      bad = "VS_Rgn2Sp must be greater than VS_CtInSp"
    else if (.not. (par(VS_RGN2K) >= 0)) then
      bad = "VS_Rgn2K must be >= 0"
    else if (.not. (par(VS_RTGNSP) > par(VS_RGN2SP))) then
      bad = "VS_RtGnSp must be greater than VS_Rgn2Sp"
    else if (.not. (par(VS_RTPWR) > 0)) then
      bad = "VS_RtPwr must be > 0"
    else if (.not. (par(VS_SLPC) > 0)) then
      bad = "VS_SlPc must be > 0"
    else if (.not. (par(VS_MAXTQ) > 0)) then
      bad = "VS_MaxTq must be > 0"
    else if (.not. (par(VS_MAXRAT) > 0)) then
      bad = "VS_MaxRat must be > 0"
    else if (.not. (par(PC_REFSPD) > 0)) then
      bad = "PC_RefSpd must be > 0"
    else if (.not. (par(PC_KP) >= 0)) then
      bad = "PC_KP must be >= 0"
    else if (.not. (par(PC_KI) > 0)) then
      bad = "PC_KI must be > 0"
    else if (.not. (par(PC_KK) > 0)) then
      bad = "PC_KK must be > 0"
    else if (.not. (par(PC_MAXPIT) > par(PC_MINPIT))) then
      bad = "PC_MaxPit must be greater than PC_MinPit"
    else if (.not. (par(PC_MAXRAT) > 0)) then
      bad = "PC_MaxRat must be > 0"
    end if
    if (len(bad) > 0) then
      call fail("input file '" // name // "': " // bad // "; correct it in the input file")
      return
    end if

    sySp = par(VS_RTGNSP) / (1.0_dp + 0.01_dp * par(VS_SLPC))
    slope15 = (par(VS_RGN2K) * par(VS_RGN2SP) * par(VS_RGN2SP)) / (par(VS_RGN2SP) - par(VS_CTINSP))
    slope25 = (par(VS_RTPWR) / par(VS_RTGNSP)) / (par(VS_RTGNSP) - sySp)
    if (par(VS_RGN2K) == 0.0_dp) then
      trGnSp = sySp
    else
      disc = slope25 * (slope25 - 4.0_dp * par(VS_RGN2K) * sySp)
      if (disc < 0.0_dp) then
        call fail("input file '" // name // "': the region-2 curve VS_Rgn2K*w^2 never meets "// &
                  "the region-2.5 line set by VS_RtGnSp, VS_RtPwr and VS_SlPc; lower "// &
                  "VS_Rgn2K or raise VS_SlPc")
        return
      end if
      trGnSp = (slope25 - sqrt(disc)) / (2.0_dp * par(VS_RGN2K))
    end if
    ok = .true.
  end function derive

end subroutine DISCON
